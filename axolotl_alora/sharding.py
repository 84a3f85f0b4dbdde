"""Ω sharded across data-parallel ranks (`alora_shard_importance`, docs/MEMORY.md).

Each rank holds, tracks and regularizes only the modules it owns; ownership is balanced by element count.
The general stage needs no communication for ω (the gradients it reads are already all-reduced); the
domain stage sums L_reg's value across ranks and scales each owned gradient by W (regularizer.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def owners(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """The rank that owns each module: largest first, each to the least-loaded rank (lowest rank on ties).

    Deterministic in the sizes alone, so every rank, and any later run with the same modules, agrees."""
    loads = [0] * world_size
    owner = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda k: (loads[k], k))
        owner[name] = rank
        loads[rank] += sizes[name]
    return owner


def rank_loads(sizes: dict[str, int], world_size: int) -> list[int]:
    """Elements each rank holds under `owners`."""
    loads = [0] * world_size
    for name, rank in owners(sizes, world_size).items():
        loads[rank] += sizes[name]
    return loads


def data_parallel() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's when it is initialized, else the launcher's env."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass(frozen=True)
class Shard:
    """This process's share: the modules it owns among all of them."""

    rank: int
    world_size: int
    owned: frozenset[str]

    @classmethod
    def of(cls, sizes: dict[str, int], rank: int, world_size: int) -> Shard:
        owner = owners(sizes, world_size)
        return cls(rank, world_size, frozenset(n for n, k in owner.items() if k == rank))

    @classmethod
    def whole(cls, names) -> Shard:
        return cls(0, 1, frozenset(names))

    @property
    def sharded(self) -> bool:
        return self.world_size > 1
