"""Device resolution: the one place that says what "auto", "cpu", "cuda" and "cuda:N" mean, for encoders,
ProAlign, extraction ranks, K-means, the session's settings and ``src_training``.

- ``"auto"``: CUDA when torch sees a GPU, else the CPU;
- ``"cuda"`` / ``"cuda:N"``: that GPU, an error that says so when there is none;
- anything else torch understands (``"cpu"``, ``"mps"``...) is passed to :class:`torch.device`.

Under torchrun each process picks its own GPU: a training rank takes GPU ``local_rank`` (NCCL needs one GPU
per rank), an extraction rank GPU ``local_rank % n_gpus`` (several readers may share one GPU).
torch is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari_slpd.errors import SlpdError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# What a settings field or a --device option offers ("cuda:N" is accepted as well).
DEVICE_CHOICES = ("auto", "cuda", "cpu")

__all__ = ["DEVICE_CHOICES", "cuda_available", "check_device_name", "resolve_device", "rank_device",
           "cuda_index", "kmeans_device", "autocast_dtype"]


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False without torch: the slide readers work without it)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def check_device_name(device: str) -> str:
    """``device`` if it is one of :data:`DEVICE_CHOICES` or "cuda:N", else a :class:`SlpdError` (settings)."""
    text = str(device)
    if text in DEVICE_CHOICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise SlpdError(f"device must be one of {DEVICE_CHOICES} or 'cuda:N', not {device!r}")


def resolve_device(device: "str | torch.device | None" = "auto", local_rank: int | None = None) -> "torch.device":
    """The :class:`torch.device` to run on. ``local_rank`` (a torchrun process) turns "auto" (on a GPU
    machine) and "cuda" into ``cuda:<local_rank>``; without it they stay plain "cuda" (the current GPU)."""
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if local_rank is None else f"cuda:{int(local_rank)}")
    if isinstance(device, str) and device == "cuda" and local_rank is not None:
        device = f"cuda:{int(local_rank)}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SlpdError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlpdError(f"device {str(device)!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    return dev


def rank_device(device: str, local_rank: int, world_size: int) -> str:
    """The device name one extraction process of ``world_size`` uses: with several processes on a GPU
    machine, "auto" and "cuda" become ``cuda:<local_rank % n_gpus>``; otherwise ``device`` unchanged."""
    if int(world_size) > 1 and device in ("auto", "cuda") and cuda_available():
        import torch

        return f"cuda:{int(local_rank) % torch.cuda.device_count()}"
    return device


def cuda_index(device: str) -> int:
    """The GPU number of "cuda:N" (0 for "cuda", "auto" and anything else)."""
    text = str(device).lower()
    if text.startswith("cuda:"):
        return int(text.split(":", 1)[1])
    return 0


def kmeans_device(device: str) -> str:
    """The device setting faiss K-means gets from a features device: "auto", "cuda" or "cpu" (faiss
    chooses the GPU itself)."""
    return "auto" if device == "auto" else ("cuda" if str(device).startswith("cuda") else "cpu")


def autocast_dtype(amp: str, device: "torch.device") -> "tuple[torch.dtype | None, bool]":
    """(autocast dtype or None, needs a grad scaler) of a training run's ``amp`` mode ("auto": bfloat16 on
    CUDA, none elsewhere; "bf16"; "fp16": CUDA only, with a grad scaler; "off") on ``device``."""
    import torch

    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None, False
    if amp in ("auto", "bf16"):
        return torch.bfloat16, False
    if amp == "fp16":
        if device.type != "cuda":
            raise SlpdError("--amp fp16 needs a CUDA device; use bf16 or off on CPU")
        return torch.float16, True
    raise SlpdError(f"unknown amp mode {amp!r}")
