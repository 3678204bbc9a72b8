"""Which first stage a machine gets: the device, the storage type of the reduced copy (int8, bfloat16,
float16 or float32) and a one-time check, per process, that the type's rounding margin holds for this
machine's products (bounds.py explains the margin; int8_codes.py the int8 codes). ``create_stage`` is how
the index builds its first stage."""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np

from napari_slpd.errors import PrototypeError, SlpdError
from napari_slpd.similarity.bounds import PRECISIONS, BoundStage
from napari_slpd.similarity.int8_codes import MAX_DIM
from napari_slpd.utils.device import resolve_device

log = logging.getLogger(__name__)

_checked: dict[tuple[str, str], object] = {}  # (precision or "auto", device:dim) -> check or choice
_check_lock = threading.Lock()


def index_device(device: str | None) -> str:
    """The name of the device the first stage runs on (utils.device.resolve_device: "auto" is CUDA when
    available), with the index's own message when CUDA was asked for and is missing."""
    try:
        return str(resolve_device(device or "auto"))
    except SlpdError as exc:
        if str(device).startswith("cuda"):
            raise PrototypeError("the similarity index was asked to use CUDA but no CUDA device is available") from exc
        raise PrototypeError(f"similarity index: {exc}") from exc


def choose_precision(precision: str | None, device: str, dim: int) -> str:
    """The storage type of the reduced copy. "auto": float32 on CUDA (the product costs microseconds
    there; no TF32); on CPU bfloat16 where AMX multiplies it at the memory bandwidth, int8 where the CPU
    has 8-bit dot products (VNNI: half of bfloat16's bytes; bfloat16 without AMX was no faster than
    float32), else whichever of int8 and float32 a timed product shows faster; always after the margin
    checked out on this machine (else float32)."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise PrototypeError(f"index precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "int8" and (device != "cpu" or dim > MAX_DIM):
        precision = "float32"  # the int8 product runs on CPU; CUDA's float32 product is faster anyway
    if precision != "auto":
        return precision if _self_check(precision, device, dim) else "float32"
    if device != "cpu":
        return "float32"
    key = ("auto", str(dim))
    if key not in _checked:
        flags = _cpu_flags()
        if flags is not None and "amx_bf16" in flags:
            choice = "bfloat16"
        elif flags is not None and flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}:
            choice = "int8"
        else:  # unknown CPU: time it (minimum of several runs: robust to a busy machine)
            choice = "int8" if _int8_speedup(dim) >= 1.5 else "float32"
        if choice == "int8" and dim > MAX_DIM:
            choice = "bfloat16" if flags and "avx512_bf16" in flags else "float32"
        _checked[key] = choice
        log.info("similarity bounds: first stage in %s", choice)
    choice = _checked[key]
    return choice if _self_check(choice, device, dim) else "float32"


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (/proc/cpuinfo), None if unknown. A timed comparison on a shared machine
    picked the slower type once in ten runs; the flags do not flicker."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _int8_speedup(dim: int) -> float:
    """float32 product time / int8 product time (with its 2 K hi/lo columns) on this machine."""
    import torch

    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.standard_normal((65536, dim), dtype=np.float32))
    codes = torch.from_numpy(rng.integers(-127, 128, size=(65536, dim), dtype=np.int8))
    q = torch.from_numpy(rng.standard_normal((dim, 16), dtype=np.float32))
    q8 = torch.from_numpy(rng.integers(-127, 128, size=(dim, 32), dtype=np.int8))

    def timed(product):
        best = math.inf
        for _ in range(7):
            t0 = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t0)
        return best

    try:
        return timed(lambda: torch.mm(X, q)) / max(timed(lambda: torch._int_mm(codes, q8)), 1e-9)
    except RuntimeError:  # no int8 product in this torch build
        return 0.0


def _self_check(precision: str, device: str, dim: int) -> bool:
    """Whether the margin above holds for this machine's products (random and near-parallel vectors)."""
    if precision == "float32":
        return True
    key = (precision, f"{device}:{dim}")
    with _check_lock:
        if key in _checked:
            return _checked[key]
        import torch

        rng = np.random.default_rng(1)
        X = rng.standard_normal((4096, dim)).astype(np.float32)
        Q = rng.standard_normal((16, dim)).astype(np.float32)
        X[:16] = Q + 1e-3 * rng.standard_normal((16, dim)).astype(np.float32)  # cosines near 1
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        Q /= np.linalg.norm(Q, axis=1, keepdims=True)
        if precision == "int8":
            ok = _int8_check(X, Q)
            if not ok:
                log.warning("similarity bounds: int8 products on %s exceed the margin; using float32", device)
            _checked[key] = ok
            return ok
        stage = BoundStage(dim, precision=precision, device=device)
        dtype = stage.dtype
        Xt = torch.from_numpy(X)
        Qt = torch.from_numpy(Q)
        Xl, Ql = Xt.to(dtype), Qt.to(dtype)
        ex = (Xt - Xl.float()).norm(dim=1).numpy()
        eq = (Qt - Ql.float()).norm(dim=1).numpy()
        qn = Ql.float().norm(dim=1).numpy()
        got = torch.mm(Xl.to(device), Ql.T.contiguous().to(device)).float().cpu().numpy()
        true = X.astype(np.float64) @ Q.astype(np.float64).T
        margin = stage.u * 1.01 * np.abs(got) + eq[None, :] + qn[None, :] * ex[:, None] + stage.acc_eps
        ok = bool((true <= got + margin).all())
        if not ok:
            log.warning("similarity bounds: %s products on %s exceed the rounding margin; using float32",
                        precision, device)
        _checked[key] = ok
        return ok


def _int8_check(X: np.ndarray, Q: np.ndarray) -> bool:
    """The int8 stage's bounds and padded similarities against float64 truth, through the stage itself."""
    sets = X.reshape(-1, 16, X.shape[1])
    stage = BoundStage(X.shape[1], precision="int8")
    try:
        stage.add(np.arange(len(sets)), sets)
        bounds = stage.upper_bounds(Q[None], len(sets))[0]
        padded = stage.padded_similarities(np.arange(len(sets)))
    except RuntimeError as exc:  # no int8 product in this torch build
        log.info("similarity bounds: no int8 product (%s)", exc)
        return False
    true = np.einsum("ke,nle->nkl", Q.astype(np.float64), sets.astype(np.float64))
    row_max = np.maximum(true.max(axis=2), 0).sum(axis=1) - 16
    return bool((bounds >= row_max).all() and padded is not None and (padded >= true).all())



def create_stage(dim: int, precision: str | None = "auto", device: str | None = "auto") -> BoundStage:
    """An empty first stage for ``dim``-dimensional prototypes on the resolved device and precision."""
    device = index_device(device)
    return BoundStage(dim, choose_precision(precision, device, dim), device)
