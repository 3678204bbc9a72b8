"""int8 codes of prototype sets and queries for the first stage, with the exact error of each code.

Why int8 (measured on 2 cores without AMX, 100,000 slides x 16 x 192-d): the first stage reads every
stored prototype once per query, so its time is the bytes read; a bfloat16 copy (614 MB) took ~75 ms per
core-half there (the bf16 kernels were compute-bound, no faster than float32), the int8 copy (307 MB,
VNNI through ``torch._int_mm``) ~28 ms, at the memory bandwidth (~10 GB/s for 2 cores).

Stored sets: one scale per slide, s = max |x| / 127 over all of the slide's prototypes, so that the
integer products of one slide share a scale and their maximum over the slide's prototypes is taken on
the integers (exact, in cache). ``err`` is the largest ||x_l - s * code_l|| of the slide (float64).

Queries: a code in two int8 parts, q ~ s_q (hi + lo / 254), so that the query's own rounding error is
~254x smaller than a plain int8 code's and the margin is the stored side's alone. The product of a slide
with the [E, 2 QK] query codes gives H (hi) and Lo (lo) in int32; the stage takes max_l H and max_l Lo
per query prototype and bounds max_l (254 H + Lo) <= 254 max_l H + max_l Lo (Lo is a rounding residual:
the looseness is a few 1e-4 of a cosine). Everything in int32 is exact (|254 H + Lo| <= 255 * 127^2 * E
< 2^31 for E <= 512; checked).

For a stored x and query q (||x|| <= 1 + 1e-5, normalized float32):
    <q, x> <= s s_q (254 H + Lo) / 254 + ||q~|| err_x + ||q - q~|| (1 + 1e-5)
with q~ = s_q (hi + lo / 254); computed in float64 (rounding ~1e-16 relative, covered by a 1e-9 slack).
"""

from __future__ import annotations

import numpy as np

LO_FACTOR = 254  # lo codes are round(254 * residual), residual in [-0.5, 0.5]: |lo| <= 127
MAX_DIM = (2**31 - 1) // (255 * 127 * 127)  # 524: 254 H + Lo stays inside int32
NORM_SLACK = 1.0 + 1e-5  # normalized float32 vectors have norms within a few ulps of 1
SLACK = 1e-9  # float64 rounding of the scaled sums and margins


def encode_sets(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [N, L, E] int8, scale [N] float64, err [N] float64) of normalized float32 sets [N, L, E]."""
    x = np.asarray(vectors, np.float64)
    peak = np.abs(x).max(axis=(1, 2))
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    codes = np.clip(np.rint(x / scale[:, None, None]), -127, 127).astype(np.int8)
    err = np.linalg.norm(x - codes * scale[:, None, None], axis=2).max(axis=1)
    return codes, scale, err * (1 + 1e-9) + SLACK


def encode_queries(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codes of query sets [Q, K, E]: (hi/lo codes [E, 2 Q K] int8 (hi columns first, query-major),
    scale [Q] float64, ||q - q~|| [Q, K] and ||q~|| [Q, K] float64)."""
    Q, K, E = queries.shape
    if E > MAX_DIM:
        raise ValueError(f"int8 codes hold up to {MAX_DIM} dimensions, not {E}")
    q = np.asarray(queries, np.float64)
    peak = np.abs(q).max(axis=(1, 2))
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    unit = q / scale[:, None, None]
    hi = np.clip(np.rint(unit), -127, 127)
    lo = np.clip(np.rint((unit - hi) * LO_FACTOR), -127, 127)
    approx = (hi + lo / LO_FACTOR) * scale[:, None, None]
    eq = np.linalg.norm(q - approx, axis=2) * (1 + 1e-9) + SLACK
    qn = np.linalg.norm(approx, axis=2) * (1 + 1e-9)
    codes = np.concatenate([hi.reshape(Q * K, E), lo.reshape(Q * K, E)]).T.astype(np.int8)
    return np.ascontiguousarray(codes), scale, eq, qn


def query_columns(codes: np.ndarray, row: int, K: int) -> np.ndarray:
    """[E, 2K] hi/lo codes of query ``row`` out of :func:`encode_queries`' [E, 2 Q K] codes."""
    QK = codes.shape[1] // 2
    return np.ascontiguousarray(np.concatenate([codes[:, row * K : (row + 1) * K],
                                                codes[:, QK + row * K : QK + (row + 1) * K]], axis=1))


def combine(products: np.ndarray) -> np.ndarray:
    """254 H + Lo (int64) from products [..., 2 n] (hi columns first)."""
    n = products.shape[-1] // 2
    return products[..., :n].astype(np.int64) * LO_FACTOR + products[..., n:]
