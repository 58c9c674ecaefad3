"""One process or several (torchrun): the rank, the device and the few collective operations training needs."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    def wrap(self, model) -> None:
        """Several processes: shard the model (issue 10); one process: nothing to do."""

    def sync_grads(self, opt) -> None:
        """Several processes: the gradients are averaged over them before the optimizer step."""

    def mean(self, x: float) -> float:
        return self.sum(x) / self.world

    def sum(self, x):
        if self.world == 1:
            return x
        t = torch.tensor(float(x), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return type(x)(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None = None) -> Context:
    """A Context from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return Context(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Context(rank, world, device)
