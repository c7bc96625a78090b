"""One way to set up ``torch.distributed`` under ``torchrun``, shared by precompute and distill."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from libkd.engine import resolve_device


def setup(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) for this process; initialises the process group under torchrun
    (NCCL on CUDA, each rank on its LOCAL_RANK GPU; gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def setup_processes(cfg) -> tuple[int, int, torch.device]:
    """``setup`` for a training config: train.batch_size is the global batch, so it must divide by the processes."""
    from libkd import LibkdError

    rank, world, device = setup(cfg.device)
    if cfg.train.batch_size % world:
        raise LibkdError(f"train.batch_size={cfg.train.batch_size} is the global batch and must divide by the {world} processes")
    return rank, world, device
