"""The micro-batches each process trains on, epoch after epoch, and where they stand (for checkpoints).

Samples are shuffled per epoch with seed + epoch. Padded batches: every optimizer step takes the next
batch x accumulation x processes samples of that order, process r getting micro-batches r, r + processes, ...; so one
process with batch 2b sees what two processes with batch b see together. Packed rows (--use-packed-ds): process r
packs samples r, r + processes, ... of the order (disjoint shards) and trains on one row per micro-batch.
"""
import math
from collections import deque

import torch

from nanovl.train.data import collate
from nanovl.train.packing import Packer, packed_collate


def _loader(items, fetch, workers):
    """fetch(item) for each item, in order, prepared by `workers` processes. Its own generator: making a loader must
    not draw from the global RNG, which drop path and LoRA dropout use (a resumed run replays it exactly)."""
    return torch.utils.data.DataLoader(items, batch_size=None, collate_fn=fetch, num_workers=workers,
                                       generator=torch.Generator())


class Batches:
    """Right-padded micro-batches; iterate for the GA micro-batches of each optimizer step."""

    def __init__(self, dataset, batch_size, accumulation, rank=0, world=1, seed=42, workers=0, collate_fn=collate):
        self.dataset, self.b, self.ga, self.rank, self.world, self.seed = dataset, batch_size, accumulation, rank, \
            world, seed
        self.collate = collate_fn
        self.workers, self.epoch, self.position, self.bad = workers, 0, 0, {}
        self.per_step = batch_size * accumulation * world

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.dataset) / self.per_step))

    def state(self) -> dict:
        return dict(epoch=self.epoch, position=self.position)

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        while True:
            self.dataset.set_epoch(self.epoch)
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = order.tolist()
            order += order[:(-len(order)) % self.per_step]  # the last step of an epoch is filled from its start
            micro = [order[k:k + self.b] for k in range(self.position, len(order), self.b)][self.rank::self.world]
            batches = iter(_loader(micro, lambda idx: self.collate([self.dataset[i] for i in idx]), self.workers))
            while self.position < len(order):
                step = [next(batches) for _ in range(self.ga)]
                self.position += self.per_step  # where the next step starts (what a checkpoint records)
                for b in step:
                    self.bad.update(b.pop("bad", {}))
                yield step
            self.epoch, self.position = self.epoch + 1, 0


class PackedBatches:
    """Packed rows, one per micro-batch, from this process's shard of each epoch's order."""

    def __init__(self, dataset, packer: Packer, accumulation, rank=0, world=1, seed=42, workers=0, pad_to=0):
        self.dataset, self.packer, self.ga, self.rank, self.world, self.seed = dataset, packer, accumulation, rank, \
            world, seed
        self.workers, self.pad_to, self.bad = workers, pad_to, {}
        self.epoch, self.fed, self.pending = 0, 0, deque()  # fed: samples of this process's shard packed so far

    def state(self) -> dict:
        return dict(epoch=self.epoch, fed=self.fed, pending=list(self.pending), buffers=self.packer.buffers,
                    world=self.world)

    def load_state(self, state: dict) -> None:
        self.epoch, self.fed = state["epoch"], state["fed"]
        if state.get("world", self.world) == self.world:
            self.pending, self.packer.buffers = deque(state["pending"]), state["buffers"]
        else:  # another number of processes: the shards differ; go on from the same place in the epoch
            self.fed = state["fed"] * state["world"] // self.world

    def __iter__(self):
        while True:
            self.dataset.set_epoch(self.epoch)
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            shard = order.tolist()[self.rank::self.world]
            items = iter(_loader(shard[self.fed:], lambda i: self.dataset[i], self.workers))
            for sample in items:
                self.fed += 1
                if "bad" in sample:
                    self.bad.update(sample["bad"])
                    continue
                self.pending.extend(self.packer.add(sample))
                while len(self.pending) >= self.ga:
                    yield [packed_collate([self.pending.popleft()], self.pad_to) for _ in range(self.ga)]
            self.pending.extend(self.packer.flush())  # the end of the epoch: every buffer becomes a row
            self.epoch, self.fed = self.epoch + 1, 0
            while len(self.pending) >= self.ga:
                yield [packed_collate([self.pending.popleft()], self.pad_to) for _ in range(self.ga)]
