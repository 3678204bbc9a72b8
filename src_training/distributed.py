"""torch.distributed set-up and the few collectives the trainer needs; all are no-ops in a single process.

Launch with ``torchrun --nproc_per_node N -m src_training ...``: torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK, and each process then uses NCCL with its own GPU, or gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from napari_slpd.errors import SlpdError
from napari_slpd.utils.device import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), otherwise a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size <= 1:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        return DistContext(device=resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SlpdError(
                f"process {rank} has local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "use --nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=resolved if resolved.type == "cuda" else None,
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved, backend=backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not (is_initialized() and dist.get_world_size() > 1):
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        # NCCL reduces GPU memory only: round-trip CPU tensors (cluster results) through the GPU.
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (returns the tensor for chaining); CPU tensors work with NCCL too."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order."""
    if not (is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    if not (is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
