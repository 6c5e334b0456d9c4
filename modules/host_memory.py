"""Host memory for the CPU training step: glibc's allocator kept from returning every large
activation to the kernel (`heap_allocations`). Own code: torch has no CPU caching allocator,
and glibc's only switches are mallopt's, reached through ctypes."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

import torch

# glibc's mallopt parameter numbers and its default M_MMAP_MAX
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _DEFAULT_MMAP_MAX = -1, -4, 65536
_libc: ctypes.CDLL | None | bool = None          # None: not looked up yet; False: not glibc / off


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if os.environ.get("SIMULGEN_MALLOC_TUNING", "1") != "0" and _is_glibc():
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                _libc = False
    return _libc or None


@contextlib.contextmanager
def heap_allocations(device: torch.device):
    """Serve host memory from glibc's heap while the block runs, and keep it there.

    glibc serves a block above its mmap threshold (128 KiB; it adapts up to at most 32 MiB)
    with a fresh mmap and unmaps it on free, so every large activation of every training step
    is page-faulted in and zeroed again by the kernel: at N = 20,000 nodes a 61 MiB tensor
    took ~20 ms to create where the arithmetic on it takes ~2 ms, and the VAE's CPU step ran
    2.5x slower than with the memory reused (benchmarks/NOTES.md). Inside the block
    M_MMAP_MAX = 0 sends those blocks to the heap, and a high M_TRIM_THRESHOLD keeps the freed
    heap memory for the next step and the next epoch. Numerics are untouched.

    Only the training steps run inside (TrainingEngine.train_epoch): validation, loading and
    checkpointing allocate other sizes, and mixing them into the same heap fragmented it
    (+0.24 GiB RSS after the first validation at N = 20,000) where, kept outside, their
    blocks are returned as before. The price: the training heap stays at its peak, ~0.5 GiB
    above what a step needs at N = 20,000 (benchmarks/NOTES.md, "Memory").
    A no-op off the CPU, off glibc, or with SIMULGEN_MALLOC_TUNING=0; MALLOC_MMAP_MAX_ /
    MALLOC_TRIM_THRESHOLD_ set in the environment are left alone.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None or "MALLOC_MMAP_MAX_" in os.environ:
        yield
        return
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    libc.mallopt(_M_MMAP_MAX, 0)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
