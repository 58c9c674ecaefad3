"""One process, or several under torchrun with FSDP2 (torch.distributed.fsdp.fully_shard): each ViT and decoder block is
sharded over the processes, gradients are averaged over them, bf16 compute runs from fp32 sharded master weights
(FSDP's MixedPrecisionPolicy). gloo on CPU, NCCL on GPU. No communication code of nanovl's own: the collectives are
torch.distributed's, the full state dicts torch.distributed.checkpoint's.

    torchrun --nproc-per-node 2 -m nanovl.train --model ... --meta ... --output ...
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    mixed_bf16: bool = False  # several processes with --dtype bf16: the model is loaded in fp32 and computes in bf16

    def load_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype to load the model in: FSDP keeps fp32 masters itself and casts to bf16 for compute."""
        self.mixed_bf16 = self.world > 1 and dtype == torch.bfloat16
        return torch.float32 if self.mixed_bf16 else dtype

    def wrap(self, model) -> None:
        """Several processes: fully_shard every ViT layer, every decoder block, then the rest (embeddings, mlp1, the
        head, norms) as the root group."""
        if self.world == 1:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.mixed_bf16 \
            else MixedPrecisionPolicy()
        for block in list(model.vision_model.encoder.layers) + list(model.language_model.model.layers):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)

    # -- small collectives
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
            dist.barrier()  # gloo: a process that tears down while another still talks to it can abort (SIGABRT)
            dist.destroy_process_group()

    # -- state for checkpoints: always full tensors under nanovl's parameter names, so any number of processes
    #    can resume from them
    def full_state_dict(self, model) -> dict:
        """The whole model's state dict (on process 0; gathered from the shards, on the CPU)."""
        if self.world == 1:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def gather_trainer_state(self, model, opt) -> dict:
        """{"masters": {name: fp32 tensor}, "optimizer": {"state": {name: {...}}, "param_groups": [...]}}."""
        if self.world == 1:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = self.full_state_dict(model)
        optimizer = get_optimizer_state_dict(model, opt.opt, options=options)
        return {"masters": {n: sd[n] for n in opt.names if n in sd}, "optimizer": optimizer}

    def load_trainer_state(self, model, opt, state: dict) -> None:
        if self.world == 1:
            return opt.load_state_dict(state)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, state["masters"], options=options)
        optimizer = state["optimizer"]
        if isinstance(next(iter(optimizer["state"]), ""), int):  # written by one process: indices -> names
            optimizer = opt.named(optimizer)
        set_optimizer_state_dict(model, opt.opt, optim_state_dict=optimizer, options=options)


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
