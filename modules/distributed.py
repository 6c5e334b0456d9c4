"""Process-group set-up and rank-aware helpers (DDP started by torchrun)."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from modules.errors import UserError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when it is usable, else the CPU."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is usable here; use --device cpu or --device auto.")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(use_ddp: bool, device_choice: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun prepared (NCCL on GPUs, Gloo on CPUs)."""
    if not use_ddp:
        return SINGLE, resolve_device(device_choice)
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise UserError("--use_ddp must be started by torchrun (missing " + ", ".join(missing)
                        + "); run e.g. 'torchrun --nproc_per_node=2 SimulGen-VAE.py --use_ddp ...', or drop --use_ddp.")
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    device = resolve_device(device_choice, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return info, device


def shutdown() -> None:
    """Leave the process group.

    Trainers hold their engine (and its DDP wrapper, which holds the process group) in
    reference cycles, so without a collection they would be freed only while the interpreter
    shuts down; a Gloo rank then sometimes aborted at exit ("terminate called without an
    active exception") after all its work was done. Collect them first, while Python is alive.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def union_of_names(names) -> list[str]:
    """The sorted union of every rank's `names` (one object all-gather under DDP), so ranks
    that saw different metrics, or none, can reduce vectors of the same length and order."""
    mine = sorted(set(names))
    if not dist.is_initialized():
        return mine
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return sorted(set().union(*every))


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def per_rank_batch(global_batch: int, world_size: int, key: str) -> int:
    """The global batch `key` split evenly across the DDP processes."""
    if global_batch % world_size:
        raise UserError(f"{key} = {global_batch} is not divisible by the {world_size} DDP processes; "
                        f"use a multiple of {world_size}.")
    return global_batch // world_size
