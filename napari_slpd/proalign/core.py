"""ProAlign without trained parameters (SPEC section 4): text prototypes, visual prototypes, slide embedding.

Notation (one slide, N patches, K prototype types, D = the VLM's joint embedding dimension):

- v_n: patch embeddings in the vision-language space. They are used L2-normalized: the joint space of a
  CLIP-style model is the unit sphere (its own image-text logits compare normalized embeddings), so the
  weighted sums below average unit vectors and do not depend on per-patch feature norms.
- t_k = normalize(mean_i normalize(text(description_ik)))                      text prototypes
- p_k = sum_n softmax_n(cos(v_n, t_k) / tau) v_n                                visual prototypes
- s_k = sum_n softmax_n(cos(v_n, p_k) / tau) v_n,  slide = concat_k s_k, and mean_k s_k
- label_n = argmax_k cos(v_n, t_k), confidence_n = softmax_k(cos(v_n, t_k) / tau)[label_n]

The softmax over patches runs streamed over chunks of patches with a running log-sum-exp (the "online
softmax"): for every prototype the running maximum logit m, the running normalizer l = sum exp(logit - m)
and the running weighted sum a = sum exp(logit - m) v are rescaled by exp(m_old - m_new) whenever the
maximum grows. Memory is O(chunk * K + K * D) whatever the number of patches, and the result equals the
softmax over all patches at once (up to float rounding). Features are read chunk by chunk, so an h5py
dataset of 100k x 512 patches is never loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from napari_slpd.errors import PrototypeError, SlpdError
from napari_slpd.utils.device import resolve_device
from napari_slpd.utils.progress import Cancelled, ProgressFn, is_cancelled  # noqa: F401  (re-exported)

DEFAULT_TAU = 0.05
DEFAULT_CHUNK = 16384
_EPS = 1e-12



@dataclass(frozen=True)
class ProAlignConfig:
    """Settings of the parameter-free aggregation (SPEC section 4)."""

    tau: float = DEFAULT_TAU            # temperature of every softmax (patches and label confidence)
    chunk_size: int = DEFAULT_CHUNK     # patches per streamed chunk: bounds memory, not the result
    device: str = "auto"                # "auto" = CUDA when available, else CPU

    def __post_init__(self):
        if not (self.tau > 0 and np.isfinite(self.tau)):
            raise SlpdError(f"tau must be a positive number, not {self.tau!r}")
        if int(self.chunk_size) < 1:
            raise SlpdError(f"chunk_size must be at least 1, not {self.chunk_size!r}")

    def to_attrs(self) -> dict:
        return {"tau": float(self.tau)}


@dataclass
class TextPrototypes:
    """t_k of one description set, with the names and colours of the prototype types."""

    names: list[str]
    colors: list[str]
    embeddings: np.ndarray              # [K, D] float32, rows L2-normalized
    organ: str = ""
    version: str = ""
    descriptions_sha256: str = ""
    model_id: str = ""                  # the VLM whose text tower made them

    @property
    def k(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


@dataclass
class SlideAlignment:
    """Everything ProAlign computes for one slide."""

    visual_prototypes: np.ndarray       # [K, D] p_k
    prototype_embeddings: np.ndarray    # [K, D] s_k
    slide_embedding: np.ndarray         # [K * D] concat_k s_k
    slide_embedding_mean: np.ndarray    # [D] mean_k s_k
    labels: np.ndarray                  # [N] int32 argmax_k cos(v_n, t_k)
    confidence: np.ndarray              # [N] float32 softmax_k(cos / tau) of the label
    similarity: np.ndarray              # [N] float32 cos(v_n, t_label): low everywhere = nothing fits
    attention: np.ndarray | None        # [N, K] float32 softmax_n(cos(v_n, p_k) / tau); columns sum to 1


# -- helpers -----------------------------------------------------------------------------------------------
def _check_cancel(cancel) -> None:
    if is_cancelled(cancel):
        raise Cancelled("cancelled")


def _num_rows(features) -> int:
    shape = getattr(features, "shape", None)
    if shape is None or len(shape) != 2:
        raise PrototypeError(f"patch features must be a 2-d [N, D] array, got shape {shape}")
    return int(shape[0])


def _read_chunk(features, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows [start, stop) of a numpy array, torch tensor or h5py dataset as normalized float32 on device."""
    block = features[start:stop]
    if isinstance(block, torch.Tensor):
        chunk = block.to(device=device, dtype=torch.float32)
    else:
        chunk = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(device)
    return torch.nn.functional.normalize(chunk, dim=1, eps=_EPS)


def _check_finite(logits: torch.Tensor, v: torch.Tensor, start: int) -> None:
    """NaN/inf in a patch feature reaches its logits; checking [C, K] logits is cheaper than [C, D] features."""
    if not bool(torch.isfinite(logits).all()):
        rows = (~torch.isfinite(v).all(dim=1)).nonzero()
        bad = start + (int(rows[0, 0]) if len(rows) else 0)
        raise PrototypeError(
            f"patch features hold NaN or infinite values (first at patch {bad}); extract the slide again"
        )


def _as_queries(queries, dim: int, device: torch.device, what: str) -> torch.Tensor:
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32)).to(device)
    if q.ndim != 2 or q.shape[0] < 1:
        raise PrototypeError(f"{what} must be a [K, D] array with K >= 1, got shape {tuple(q.shape)}")
    if q.shape[1] != dim:
        raise PrototypeError(
            f"{what} are {q.shape[1]}-d but the patch features are {dim}-d: both must come from the same "
            "vision-language model (extract features with --encoder open_clip:NAME and the same checkpoint)"
        )
    if not torch.isfinite(q).all():
        raise PrototypeError(f"{what} hold NaN or infinite values")
    return torch.nn.functional.normalize(q, dim=1, eps=_EPS)


class _OnlineSoftmaxPool:
    """Running sum_n softmax_n(logit_nk) v_n over chunks of patches (one per prototype k)."""

    def __init__(self, k: int, dim: int, device: torch.device):
        self.m = torch.full((k,), -float("inf"), dtype=torch.float64, device=device)   # running max logit
        self.l = torch.zeros(k, dtype=torch.float64, device=device)                    # sum exp(logit - m)
        self.acc = torch.zeros(k, dim, dtype=torch.float64, device=device)             # sum exp(logit - m) v

    def update(self, logits: torch.Tensor, v: torch.Tensor) -> None:
        """``logits`` [C, K], ``v`` [C, D] (the chunk's patches)."""
        chunk_max = logits.max(dim=0).values.to(torch.float64)
        m_new = torch.maximum(self.m, chunk_max)
        rescale = torch.exp(self.m - m_new)  # exp(-inf) = 0 on the first chunk
        # exp in float64: logit - m rounded in float32 would already be off by ~1e-6 relative at |logit| ~ 20
        w = torch.exp(logits.to(torch.float64) - m_new)                                # [C, K] in (0, 1]
        self.l = self.l * rescale + w.sum(dim=0)
        self.acc = self.acc * rescale[:, None] + (w.to(v.dtype).T @ v).to(torch.float64)
        self.m = m_new

    @property
    def logsumexp(self) -> torch.Tensor:
        return self.m + torch.log(self.l)

    def result(self) -> torch.Tensor:
        return (self.acc / self.l[:, None]).to(torch.float32)


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


# -- text prototypes --------------------------------------------------------------------------------------
def text_prototypes(descriptions, encode_text) -> TextPrototypes:
    """t_k = normalize(mean over a type's descriptions of their normalized text embeddings).

    ``descriptions``: a :class:`~napari_slpd.proalign.descriptions.PrototypeDescriptions`.
    ``encode_text``: a :class:`~napari_slpd.proalign.vlm.VisionLanguageModel` or any callable
    ``list[str] -> [T, D]`` array/tensor.
    """
    encode = getattr(encode_text, "encode_text", encode_text)
    texts: list[str] = []
    owners: list[int] = []
    for k, proto in enumerate(descriptions.prototypes):
        texts.extend(proto.descriptions)
        owners.extend([k] * len(proto.descriptions))
    if not texts:
        raise PrototypeError("the prototype descriptions hold no text")
    emb = torch.as_tensor(np.asarray(_to_numpy(encode(texts)), dtype=np.float64))
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise PrototypeError(f"the text encoder returned shape {tuple(emb.shape)} for {len(texts)} texts")
    emb = torch.nn.functional.normalize(emb, dim=1, eps=_EPS)
    owner = torch.as_tensor(owners)
    k = len(descriptions.prototypes)
    sums = torch.zeros(k, emb.shape[1], dtype=torch.float64).index_add_(0, owner, emb)
    means = sums / torch.bincount(owner, minlength=k)[:, None].to(torch.float64)
    protos = torch.nn.functional.normalize(means, dim=1, eps=_EPS).to(torch.float32).numpy()
    return TextPrototypes(
        names=list(descriptions.names),
        colors=list(descriptions.colors),
        embeddings=protos,
        organ=descriptions.organ,
        version=descriptions.version,
        descriptions_sha256=descriptions.content_sha256,
        model_id=str(getattr(encode_text, "model_id", "")),
    )


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _text_matrix(text_protos) -> np.ndarray:
    return text_protos.embeddings if isinstance(text_protos, TextPrototypes) else np.asarray(text_protos)


# -- attention pooling (the parameter-free aggregation) ----------------------------------------------------
def attention_pool(features, queries, tau: float = DEFAULT_TAU, chunk_size: int = DEFAULT_CHUNK,
                   device="auto", progress: ProgressFn | None = None, cancel=None) -> np.ndarray:
    """sum_n softmax_n(cos(v_n, q_k) / tau) v_n for every query q_k: [K, D], streamed over patches."""
    n = _num_rows(features)
    if n == 0:
        raise PrototypeError("the slide has no patch features to aggregate")
    dev = resolve_device(device)
    q = _as_queries(queries, int(features.shape[1]), dev, "prototypes")
    pool = _OnlineSoftmaxPool(q.shape[0], q.shape[1], dev)
    spans = _chunks(n, int(chunk_size))
    with torch.no_grad():
        for i, (start, stop) in enumerate(spans):
            _check_cancel(cancel)
            v = _read_chunk(features, start, stop, dev)
            logits = v @ q.T / tau
            _check_finite(logits, v, start)
            pool.update(logits, v)
            if progress:
                progress(i + 1, len(spans))
    return pool.result().cpu().numpy()


def attention_weights(features, queries, tau: float = DEFAULT_TAU, chunk_size: int = DEFAULT_CHUNK,
                      device="auto") -> np.ndarray:
    """softmax_n(cos(v_n, q_k) / tau) as [N, K] (each column sums to one). Two streamed passes."""
    n = _num_rows(features)
    if n == 0:
        raise PrototypeError("the slide has no patch features")
    dev = resolve_device(device)
    q = _as_queries(queries, int(features.shape[1]), dev, "prototypes")
    spans = _chunks(n, int(chunk_size))
    pool = _OnlineSoftmaxPool(q.shape[0], q.shape[1], dev)
    with torch.no_grad():
        for start, stop in spans:
            v = _read_chunk(features, start, stop, dev)
            logits = v @ q.T / tau
            _check_finite(logits, v, start)
            pool.update(logits, v)
        lse = pool.logsumexp
        out = np.empty((n, q.shape[0]), np.float32)
        for start, stop in spans:
            v = _read_chunk(features, start, stop, dev)
            out[start:stop] = torch.exp((v @ q.T / tau).to(torch.float64) - lse).float().cpu().numpy()
    return out


def visual_prototypes(features, text_protos, tau: float = DEFAULT_TAU, chunk_size: int = DEFAULT_CHUNK,
                      device="auto", progress: ProgressFn | None = None, cancel=None) -> np.ndarray:
    """p_k = sum_n softmax_n(cos(v_n, t_k) / tau) v_n: [K, D]."""
    return attention_pool(features, _text_matrix(text_protos), tau, chunk_size, device, progress, cancel)


def slide_embedding(features, visual_protos, tau: float = DEFAULT_TAU, chunk_size: int = DEFAULT_CHUNK,
                    device="auto", progress: ProgressFn | None = None, cancel=None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(concat_k s_k [K * D], mean_k s_k [D]) with s_k = sum_n softmax_n(cos(v_n, p_k) / tau) v_n."""
    s = attention_pool(features, visual_protos, tau, chunk_size, device, progress, cancel)
    return s.reshape(-1), s.mean(axis=0)


def zero_shot_labels(features, text_protos, tau: float = DEFAULT_TAU, chunk_size: int = DEFAULT_CHUNK,
                     device="auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [N] int32, confidence [N], similarity [N]): argmax_k cos(v_n, t_k), its softmax_k(./tau)
    probability, and the cosine itself."""
    n = _num_rows(features)
    dev = resolve_device(device)
    t = _as_queries(_text_matrix(text_protos), int(features.shape[1]), dev, "text prototypes")
    labels = np.empty(n, np.int32)
    conf = np.empty(n, np.float32)
    sim = np.empty(n, np.float32)
    with torch.no_grad():
        for start, stop in _chunks(n, int(chunk_size)):
            v = _read_chunk(features, start, stop, dev)
            cos = v @ t.T
            _check_finite(cos, v, start)
            _label_chunk(cos, tau, labels, conf, sim, start, stop)
    return labels, conf, sim


def _label_chunk(cos: torch.Tensor, tau: float, labels, conf, sim, start: int, stop: int) -> None:
    best, idx = cos.max(dim=1)
    prob = torch.softmax(cos / tau, dim=1).gather(1, idx[:, None])[:, 0]
    labels[start:stop] = idx.cpu().numpy()
    conf[start:stop] = prob.float().cpu().numpy()
    sim[start:stop] = best.float().cpu().numpy()


# -- everything for one slide, in two streamed passes ---------------------------------------------------
def align_slide(features, text_protos, config: ProAlignConfig | None = None, return_attention: bool = True,
                progress: ProgressFn | None = None, cancel=None) -> SlideAlignment:
    """Visual prototypes, slide embedding, zero-shot labels (and attention maps) of one slide.

    Pass 1 over the patches accumulates p_k and the labels; pass 2 accumulates s_k and keeps the logits
    cos(v_n, p_k) / tau ([N, K], small) so that the attention weights come out exactly normalized.
    ``progress(done, total)`` counts chunks of both passes; ``cancel`` (Event or callable) is checked per chunk.
    """
    cfg = config or ProAlignConfig()
    n = _num_rows(features)
    if n == 0:
        raise PrototypeError("the slide has no patch features (was it extracted without patch features?)")
    dev = resolve_device(cfg.device)
    dim = int(features.shape[1])
    t = _as_queries(_text_matrix(text_protos), dim, dev, "text prototypes")
    k = t.shape[0]
    spans = _chunks(n, int(cfg.chunk_size))
    total = 2 * len(spans)
    labels = np.empty(n, np.int32)
    conf = np.empty(n, np.float32)
    sim = np.empty(n, np.float32)
    logits_p = np.empty((n, k), np.float32) if return_attention else None
    with torch.no_grad():
        pool_t = _OnlineSoftmaxPool(k, dim, dev)
        for i, (start, stop) in enumerate(spans):
            _check_cancel(cancel)
            v = _read_chunk(features, start, stop, dev)
            cos = v @ t.T
            _check_finite(cos, v, start)
            pool_t.update(cos / cfg.tau, v)
            _label_chunk(cos, cfg.tau, labels, conf, sim, start, stop)
            if progress:
                progress(i + 1, total)
        p = pool_t.result()
        p_hat = torch.nn.functional.normalize(p, dim=1, eps=_EPS)
        pool_p = _OnlineSoftmaxPool(k, dim, dev)
        for i, (start, stop) in enumerate(spans):
            _check_cancel(cancel)
            v = _read_chunk(features, start, stop, dev)
            logits = v @ p_hat.T / cfg.tau
            pool_p.update(logits, v)
            if logits_p is not None:
                logits_p[start:stop] = logits.cpu().numpy()
            if progress:
                progress(len(spans) + i + 1, total)
        s = pool_p.result().cpu().numpy()
        attention = None
        if logits_p is not None:
            lse = pool_p.logsumexp.cpu().numpy()
            for start, stop in spans:  # in place, chunk by chunk: no [N, K] float64 temporary
                logits_p[start:stop] = np.exp(logits_p[start:stop].astype(np.float64) - lse[None, :])
            attention = logits_p
    return SlideAlignment(
        visual_prototypes=p.cpu().numpy(),
        prototype_embeddings=s,
        slide_embedding=s.reshape(-1).copy(),
        slide_embedding_mean=s.mean(axis=0),
        labels=labels,
        confidence=conf,
        similarity=sim,
        attention=attention,
    )


# -- region-level label map -------------------------------------------------------------------------------
def patch_region_index(patch_coords: np.ndarray, region_coords: np.ndarray, region_size: float,
                       patches_per_region: int | None = None) -> np.ndarray:
    """Index of the region holding each patch's top-left corner ([N] int64, -1 when none holds it).

    Feature files store patches region-major (G*G patches per region, in region order); that layout is
    used when the counts fit and every patch lies in its region. Otherwise (e.g. imported CLAM features)
    regions are looked up on their lattice, with a brute-force box test when they are not on one.
    """
    patch_coords = np.asarray(patch_coords, np.int64).reshape(-1, 2)
    region_coords = np.asarray(region_coords, np.int64).reshape(-1, 2)
    n, m = len(patch_coords), len(region_coords)
    if m == 0 or n == 0:
        return np.full(n, -1, np.int64)
    size = float(region_size)
    if patches_per_region and n == m * patches_per_region:
        idx = np.arange(n, dtype=np.int64) // patches_per_region
        if _inside(patch_coords, region_coords[idx], size).all():
            return idx
    # Lattice lookup: cell of each region relative to the first one.
    origin = region_coords[0]
    rel = region_coords - origin
    cells = np.rint(rel / size).astype(np.int64)
    on_lattice = bool(np.all(np.abs(cells * size - rel) <= 1.0))
    idx = np.full(n, -1, np.int64)
    if on_lattice:
        # a dense table of lattice cells -> region index, looked up for all patches at once
        low = cells.min(axis=0)
        extent = cells.max(axis=0) - low + 1
        table = np.full((int(extent[0]), int(extent[1])), -1, np.int64)
        table[cells[:, 0] - low[0], cells[:, 1] - low[1]] = np.arange(m)
        pc = np.floor((patch_coords - origin) / size).astype(np.int64) - low
        valid = (pc >= 0).all(axis=1) & (pc < extent).all(axis=1)
        idx[valid] = table[pc[valid, 0], pc[valid, 1]]
        found = idx >= 0
        ok = _inside(patch_coords[found], region_coords[idx[found]], size)
        idx[np.flatnonzero(found)[~ok]] = -1
        return idx
    for start in range(0, n, 4096):  # not a lattice: box test, in blocks to bound memory
        pc = patch_coords[start:start + 4096, None, :]
        inside = ((pc >= region_coords[None]) & (pc < region_coords[None] + size)).all(axis=2)
        has = inside.any(axis=1)
        idx[start:start + 4096] = np.where(has, inside.argmax(axis=1), -1)
    return idx


def _inside(points: np.ndarray, corners: np.ndarray, size: float) -> np.ndarray:
    return ((points >= corners) & (points < corners + size)).all(axis=1)


@dataclass
class RegionLabels:
    labels: np.ndarray       # [M] int32 majority label of the region's patches (-1: no patch)
    vote_share: np.ndarray   # [M] float32 fraction of the region's patches carrying that label
    confidence: np.ndarray   # [M] float32 mean patch confidence of the patches carrying that label


def region_labels(patch_labels: np.ndarray, patch_confidence: np.ndarray, patch_region: np.ndarray,
                  n_regions: int, k: int) -> RegionLabels:
    """Majority vote of the patch labels in each region; ties go to the label with the higher summed
    confidence."""
    patch_labels = np.asarray(patch_labels, np.int64)
    conf = np.asarray(patch_confidence, np.float64)
    keep = np.asarray(patch_region) >= 0
    flat = np.asarray(patch_region)[keep] * k + patch_labels[keep]
    votes = np.bincount(flat, minlength=n_regions * k).reshape(n_regions, k).astype(np.float64)
    conf_sum = np.bincount(flat, weights=conf[keep], minlength=n_regions * k).reshape(n_regions, k)
    # Votes decide; the summed confidence (< 1 per vote, so < votes + 1) only breaks ties.
    score = votes + conf_sum / (votes.sum(axis=1, keepdims=True) + 1.0)
    best = score.argmax(axis=1)
    total = votes.sum(axis=1)
    rows = np.arange(n_regions)
    win_votes = votes[rows, best]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, win_votes / np.maximum(total, 1), 0.0)
        mean_conf = np.where(win_votes > 0, conf_sum[rows, best] / np.maximum(win_votes, 1), 0.0)
    labels = np.where(total > 0, best, -1).astype(np.int32)
    return RegionLabels(labels, share.astype(np.float32), mean_conf.astype(np.float32))


def names_of(labels: Sequence[int], names: Sequence[str]) -> list[str]:
    """Label indices to names ("" for -1)."""
    return [names[i] if i >= 0 else "" for i in np.asarray(labels).tolist()]
