"""Spreading one prune over processes with torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

Every rank samples the same calibration windows and keeps its share of the
sequences (rank, rank + world, ...). Each rank builds its own Gram statistics;
`ReducedOracle` adds up the per-rank sums (subset losses, greedy removal
losses, routing counts, REAP numerators) with all-reduce, so every rank sees
the same numbers and takes the same decision. Rank 0 writes the outputs.

    torchrun --nproc_per_node 2 -m moe_sparsify prune --model tiny --keep 6 --device cpu
    torchrun --nnodes 2 --node_rank N --master_addr HOST --nproc_per_node 8 -m moe_sparsify prune ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .errors import UsageError

_left = False  # whether this process has joined torchrun's group and left it (see process_group)


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Inside: joined to the process group torchrun describes in the environment (no-op when run alone).

    Ranks finish at different times (rank 0 alone writes the outputs). Each rank tearing the group
    down on its own (an atexit hook) lets one close its connections while a peer still runs, or
    destroy the group while the interpreter shuts down: ways a gloo rank dies of SIGABRT. So a run
    that ends normally first waits at a barrier for every rank, then destroys the group while Python
    is fully alive; a failing one destroys it at once (its peers get an error, not a hang).
    """
    global _left
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if _left:
        # torchrun's rendezvous is made for one join per rank: a second init waits for peers that are not
        # joining again (or are gone), and hangs until its 30-minute timeout.
        raise UsageError(
            "this process already took part in a torchrun process group, and a group cannot be joined twice "
            "in one process; run each prune in its own torchrun launch"
        )
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        all_sum(torch.zeros(1))  # the barrier, on the device every other collective uses
    finally:
        dist.destroy_process_group()
        _left = True


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 of the launch (torchrun sets RANK): also true after the group is left, when results print."""
    return int(os.environ.get("RANK", "0")) == 0


def shard(token_ids: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    return token_ids[rank::size]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in float64 on the CPU (gloo) or the tensor's device (NCCL)."""
    if world()[1] == 1:
        return tensor
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = tensor.detach().to(device=backend_device, dtype=torch.float64).clone()
    dist.all_reduce(out)
    return out.to(tensor.device)


def reduce_means(values: list[float], count: int) -> list[float]:
    """Token-weighted means over ranks of per-rank means taken over `count` tokens each."""
    if world()[1] == 1:
        return values
    sums = all_sum(torch.tensor([v * count for v in values] + [float(count)], dtype=torch.float64))
    return (sums[:-1] / sums[-1]).tolist()


def gather_sequences(values: torch.Tensor) -> torch.Tensor:
    """Per-sequence values (columns) of every rank, in the calibration's own sequence order, in float64.

    Rank r holds sequences r, r + world, r + 2 world, ... (`shard`); each rank passes the columns of the
    same run of its own sequences (e.g. its batch j), which may be one shorter on the later ranks. Rows
    are the same on every rank."""
    rank, size = world()
    if size == 1:
        return values.double()
    counts = torch.zeros(size, dtype=torch.float64)
    counts[rank] = values.shape[1]
    counts = all_sum(counts).long().tolist()
    slots = torch.zeros(values.shape[0], max(counts), size, dtype=torch.float64, device=values.device)
    slots[:, : values.shape[1], rank] = values
    slots = all_sum(slots)  # [:, i, r]: rank r's i-th column, the (i * size + r)-th sequence of the run
    present = torch.arange(max(counts))[:, None] < torch.tensor(counts)[None, :]
    return slots[:, present.to(slots.device)]


class ReducedOracle:
    """A `SubsetLoss` whose answers cover every rank's tokens."""

    def __init__(self, oracle):
        self.oracle = oracle
        self.num_experts = oracle.num_experts
        self.groups = oracle.groups
        self.local_tokens = oracle.stats.num_tokens
        self.total_tokens = all_sum(torch.tensor([float(self.local_tokens)]))[0].item()

    def _mean(self, local_mean: torch.Tensor) -> torch.Tensor:
        return all_sum(local_mean * self.local_tokens) / self.total_tokens

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        return self._mean(self.oracle(keep))

    def removal_losses(self, keep: torch.Tensor) -> torch.Tensor:
        local = self.oracle.removal_losses(keep)
        gone = torch.isinf(local)  # experts not kept: the same on every rank
        return self._mean(local.masked_fill(gone, 0.0)).masked_fill(gone, float("inf"))

    def selection_counts(self) -> torch.Tensor:
        return all_sum(self.oracle.selection_counts()).round().long()

    def reap_saliency(self) -> torch.Tensor:
        return all_sum(self.oracle.reap_sums()) / self.selection_counts().clamp_min(1)

    def min_keep(self) -> int:
        return self.oracle.min_keep()
