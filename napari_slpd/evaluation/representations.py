"""Named slide representations, each computed from what a cohort already caches.

| name                  | kind          | from                                                           |
|-----------------------|---------------|----------------------------------------------------------------|
| ``region_mean``       | vector + bag  | mean of the slide's region embeddings (HIPT/SLPD baseline); the bag (all region embeddings) feeds ABMIL |
| ``patch_mean``        | vector        | mean of the slide's patch features                             |
| ``prototype_set``     | set           | the slide's cached prototypes (``slpd prototypes``): KNN and retrieval by the prototype set distance |
| ``panther``           | vector        | PANTHER (SPEC section 5): one MAP-EM step of a 16-component diagonal GMM over patch features |
| ``proalign_concat``   | vector        | ProAlign slide embedding, concat over prototypes (``slpd proalign``) |
| ``proalign_mean``     | vector        | ProAlign slide embedding, mean over prototypes                 |

Region embeddings can exist in several versions (one per region encoder, e.g. before and after an SLPD
fine-tune). :func:`region_embedding_sources` is the hook that lists them: it returns
``[(version, loader)]`` with ``loader(slide_id) -> [M, E] float32``; version ``"current"`` is the
embeddings in the feature file. Every version other than "current" gets its own ``region_mean@VERSION``
representation. Replace the hook with :func:`set_region_embedding_sources` (the feature store's
versioning does).

PANTHER's prototypes are K-means centroids of patch features sampled from the evaluated slides: no label
is used, so no label leaks into test folds, but unlike the PANTHER paper they are not refit per training
split (one embedding per slide lets every protocol and the exported embeddings share it).

```python
from napari_slpd.evaluation.representations import list_representations, load_representation
infos = list_representations(cohort)            # [RepresentationInfo(name, kinds, available, n_slides, note)]
rep = load_representation(cohort, "region_mean", slide_ids, progress=None, cancel=None)
rep.vectors [N, D] | None; rep.sets [N x [K, E]] | None; rep.bags [N x [M, E]] | None; rep.missing {id: why}
```
A representation that was never computed raises RepresentationError saying which command computes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from napari_slpd.evaluation.errors import RepresentationError
from napari_slpd.utils.progress import raise_if_cancelled

log = logging.getLogger(__name__)

VECTOR, SET, BAG = "vector", "set", "bag"
PANTHER_K = 16
PANTHER_SIGMA = 0.1  # initial diagonal covariance (PANTHER's ot_eps)
PANTHER_TAU = 0.001  # MAP prior strength
PANTHER_SAMPLE = 200_000  # patch features sampled for the K-means prototypes
_CHUNK_ROWS = 65_536

RegionLoader = Callable[[str], np.ndarray]


# -- the region-embedding versions hook ----------------------------------------------------------------------


def _current_region_embeddings(cohort) -> RegionLoader:
    from napari_slpd.features.store import FeatureStore

    def load(slide_id: str) -> np.ndarray:
        with FeatureStore.open(cohort.features_path(slide_id)) as store:
            return np.array(store.region_embeddings, np.float32)

    return load


def _default_region_sources(cohort) -> list[tuple[str, RegionLoader]]:
    return [("current", _current_region_embeddings(cohort))]


_region_sources: Callable[[object], list[tuple[str, RegionLoader]]] = _default_region_sources


def region_embedding_sources(cohort) -> list[tuple[str, RegionLoader]]:
    """``[(version, loader)]`` of every region-embedding version the cohort holds ("current" first)."""
    return list(_region_sources(cohort))


def set_region_embedding_sources(provider: Callable[[object], list[tuple[str, RegionLoader]]] | None) -> None:
    """Replace the hook (None restores the default: the feature files' current embeddings only)."""
    global _region_sources
    _region_sources = provider or _default_region_sources


# -- what a representation is ---------------------------------------------------------------------------------


@dataclass
class LoadedRepresentation:
    """A representation of ``slide_ids`` (in that order); slides in ``missing`` have no data (and are
    absent from ``slide_ids``)."""

    name: str
    slide_ids: list[str]
    vectors: np.ndarray | None = None
    sets: list[np.ndarray] | None = None
    bags: list[np.ndarray] | None = None
    missing: dict[str, str] = field(default_factory=dict)
    description: str = ""

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, v in ((VECTOR, self.vectors), (SET, self.sets), (BAG, self.bags)) if v is not None)

    def take(self, slide_ids: list[str]) -> "LoadedRepresentation":
        """The same representation for ``slide_ids`` (each must be present), in that order."""
        index = {s: i for i, s in enumerate(self.slide_ids)}
        rows = [index[s] for s in slide_ids]
        return LoadedRepresentation(
            self.name, list(slide_ids),
            None if self.vectors is None else self.vectors[rows],
            None if self.sets is None else [self.sets[i] for i in rows],
            None if self.bags is None else [self.bags[i] for i in rows],
            {}, self.description,
        )


@dataclass
class RepresentationInfo:
    """One line of ``slpd evaluate --list``."""

    name: str
    kinds: tuple[str, ...]
    description: str
    available: bool
    n_slides: int
    note: str = ""  # how to compute it when it is not available

    def to_dict(self) -> dict:
        return {"name": self.name, "kinds": list(self.kinds), "description": self.description,
                "available": self.available, "n_slides": self.n_slides, "note": self.note}


@dataclass
class _Definition:
    name: str
    kinds: tuple[str, ...]
    description: str
    count: Callable[[object, list[str]], tuple[int, str]]  # (slides that have it, note when none)
    load: Callable[..., LoadedRepresentation]


# -- loaders ---------------------------------------------------------------------------------------------------


def _slides_with_features(cohort) -> list[str]:
    return [s for s in cohort.slide_ids() if cohort.features_path(s).exists()]


def _progress(progress, done, total):
    if progress is not None:
        progress(done, total)


def _region_definition(version: str, loader: RegionLoader) -> _Definition:
    name = "region_mean" if version == "current" else f"region_mean@{version}"
    what = "current region embeddings" if version == "current" else f"region embeddings of encoder {version}"

    def count(cohort, with_features):
        n = len(with_features)
        return n, "" if n else "no slide has features: run `slpd extract COHORT_OR_SLIDES --out COHORT` first"

    def load(cohort, slide_ids, progress=None, cancel=None) -> LoadedRepresentation:
        vectors, bags, kept, missing = [], [], [], {}
        for i, slide_id in enumerate(slide_ids):
            raise_if_cancelled(cancel, "loading region embeddings")
            try:
                emb = np.asarray(loader(slide_id), np.float32)
            except Exception as exc:  # noqa: BLE001 - a missing/damaged file is reported per slide
                missing[slide_id] = str(exc)
                continue
            if emb.ndim != 2 or emb.shape[0] == 0:
                missing[slide_id] = "no regions"
                continue
            vectors.append(emb.mean(axis=0))
            bags.append(emb)
            kept.append(slide_id)
            _progress(progress, i + 1, len(slide_ids))
        return LoadedRepresentation(name, kept, _stack(name, kept, vectors), None, bags, missing, what)

    return _Definition(name, (VECTOR, BAG), f"mean of the {what} (bag of them for ABMIL)", count, load)


def _stack(name: str, ids: list[str], vectors: list[np.ndarray]) -> np.ndarray:
    if not vectors:
        return np.zeros((0, 0), np.float32)
    dims = {}
    for slide_id, v in zip(ids, vectors):
        dims.setdefault(int(v.shape[-1]), []).append(slide_id)
    if len(dims) > 1:
        parts = "; ".join(f"{d}-d: {', '.join(s[:3])}{', ...' if len(s) > 3 else ''}" for d, s in dims.items())
        raise RepresentationError(
            f"{name}: the slides' embeddings have different sizes ({parts}); they come from different encoders. "
            "Extract every slide with the same encoders (slpd extract --overwrite)"
        )
    return np.stack(vectors).astype(np.float32)


def _has_patch_features(cohort, with_features: list[str]) -> bool:
    import h5py

    for slide_id in with_features[:3]:
        try:
            with h5py.File(cohort.features_path(slide_id), "r") as fh:
                if "features" in fh and fh["features"].shape[0] > 0:
                    return True
        except OSError:
            continue
    return False


_NO_PATCH = ("the feature files hold no patch features: extract again without --no-patch-features "
             "(`slpd extract SLIDES --out COHORT --overwrite`), or import CLAM/TRIDENT features with "
             "`slpd import-features`")


def _patch_count(cohort, with_features):
    if not with_features:
        return 0, "no slide has features: run `slpd extract` first"
    return (len(with_features), "") if _has_patch_features(cohort, with_features) else (0, _NO_PATCH)


def _iter_patch_chunks(cohort, slide_id: str):
    from napari_slpd.features.store import FeatureStore

    with FeatureStore.open(cohort.features_path(slide_id)) as store:
        feats = store.features
        if feats is None or feats.shape[0] == 0:
            raise RepresentationError(f"{slide_id}: {_NO_PATCH}")
        for start in range(0, feats.shape[0], _CHUNK_ROWS):
            yield np.asarray(feats[start : start + _CHUNK_ROWS], np.float32)


def _load_patch_mean(cohort, slide_ids, progress=None, cancel=None) -> LoadedRepresentation:
    vectors, kept, missing = [], [], {}
    for i, slide_id in enumerate(slide_ids):
        raise_if_cancelled(cancel, "loading patch features")
        try:
            total, n = None, 0
            for chunk in _iter_patch_chunks(cohort, slide_id):
                s = chunk.sum(axis=0, dtype=np.float64)
                total = s if total is None else total + s
                n += chunk.shape[0]
        except Exception as exc:  # noqa: BLE001
            missing[slide_id] = str(exc)
            continue
        vectors.append((total / n).astype(np.float32))
        kept.append(slide_id)
        _progress(progress, i + 1, len(slide_ids))
    if not kept:
        raise RepresentationError(f"patch_mean: {_NO_PATCH}")
    return LoadedRepresentation("patch_mean", kept, _stack("patch_mean", kept, vectors), None, None, missing,
                                "mean of the patch features")


def _prototype_count(cohort, with_features):
    n = sum(cohort.prototypes_path(s).exists() for s in with_features)
    return n, "" if n else f"no slide has prototypes: run `slpd prototypes {cohort.root}` first"


def _load_prototype_sets(cohort, slide_ids, progress=None, cancel=None) -> LoadedRepresentation:
    from napari_slpd.errors import SlpdError
    from napari_slpd.prototypes.cache import load_prototypes
    from napari_slpd.prototypes.kmeans import l2_normalize

    sets, kept, missing = [], [], {}
    for i, slide_id in enumerate(slide_ids):
        raise_if_cancelled(cancel, "loading prototypes")
        try:
            protos = load_prototypes(cohort, slide_id, check_stale=True)
        except SlpdError as exc:
            missing[slide_id] = str(exc)
            continue
        sets.append(l2_normalize(np.asarray(protos.centroids, np.float32)))
        kept.append(slide_id)
        _progress(progress, i + 1, len(slide_ids))
    if not kept:
        raise RepresentationError(f"prototype_set: no slide has current prototypes; run `slpd prototypes {cohort.root}`")
    dims = {s.shape[1] for s in sets}
    if len(dims) > 1:
        raise RepresentationError(
            f"prototype_set: prototypes of different sizes ({sorted(dims)}); recompute them with `slpd prototypes "
            f"{cohort.root} --overwrite`"
        )
    return LoadedRepresentation("prototype_set", kept, None, sets, None, missing, "cached prototypes per slide")


def panther_embedding(features: np.ndarray, prototypes: np.ndarray, sigma: float = PANTHER_SIGMA,
                      tau: float = PANTHER_TAU) -> np.ndarray:
    """PANTHER slide embedding [K + 2*K*D] = [pi, mu, diag Sigma] after one MAP-EM step of a diagonal GMM
    initialised at ``prototypes`` [K, D] (pi = 1/K, Sigma = sigma * I) over ``features`` [N, D]."""
    feats = np.asarray(features, np.float64)
    m = np.asarray(prototypes, np.float64)
    # E-step: with equal pi and Sigma the responsibilities are a softmax of -||x - m_k||^2 / (2 sigma).
    sq = (feats ** 2).sum(1)[:, None] - 2.0 * feats @ m.T + (m ** 2).sum(1)[None, :]
    logits = -0.5 * sq / sigma
    logits -= logits.max(axis=1, keepdims=True)
    resp = np.exp(logits)
    resp /= resp.sum(axis=1, keepdims=True)
    # M-step with the Dirichlet/NIW prior at (m, sigma) of strength tau (PANTHER's map_m_step).
    wsum = resp.sum(0) + tau  # [K]
    pi = wsum / wsum.sum()
    mu = (resp.T @ feats + m * tau) / wsum[:, None]
    second = (resp.T @ (feats ** 2) + (sigma + m ** 2) * tau) / wsum[:, None]
    var = second - mu ** 2
    return np.concatenate([pi, mu.reshape(-1), var.reshape(-1)]).astype(np.float32)


def _panther_streamed(cohort, slide_id, prototypes, sigma=PANTHER_SIGMA, tau=PANTHER_TAU) -> np.ndarray:
    """panther_embedding over a slide's patch features read chunk by chunk (same numbers, bounded memory)."""
    m = np.asarray(prototypes, np.float64)
    K, D = m.shape
    wsum, wx, wxx = np.zeros(K), np.zeros((K, D)), np.zeros((K, D))
    for chunk in _iter_patch_chunks(cohort, slide_id):
        x = chunk.astype(np.float64)
        sq = (x ** 2).sum(1)[:, None] - 2.0 * x @ m.T + (m ** 2).sum(1)[None, :]
        logits = -0.5 * sq / sigma
        logits -= logits.max(axis=1, keepdims=True)
        r = np.exp(logits)
        r /= r.sum(axis=1, keepdims=True)
        wsum += r.sum(0)
        wx += r.T @ x
        wxx += r.T @ (x ** 2)
    reg = wsum + tau
    pi = reg / reg.sum()
    mu = (wx + m * tau) / reg[:, None]
    var = (wxx + (sigma + m ** 2) * tau) / reg[:, None] - mu ** 2
    return np.concatenate([pi, mu.reshape(-1), var.reshape(-1)]).astype(np.float32)


def panther_prototypes(cohort, slide_ids, k: int = PANTHER_K, seed: int = 0, sample: int = PANTHER_SAMPLE,
                       cancel=None) -> np.ndarray:
    """K-means (faiss, L2) centroids [k, D] of patch features sampled evenly from ``slide_ids``."""
    from napari_slpd.prototypes.kmeans import import_faiss

    rng = np.random.default_rng(seed)
    per_slide = max(1, sample // max(1, len(slide_ids)))
    pooled = []
    for slide_id in slide_ids:
        raise_if_cancelled(cancel, "sampling patch features for PANTHER")
        rows = np.concatenate(list(_iter_patch_chunks(cohort, slide_id)))
        take = rng.choice(rows.shape[0], size=min(per_slide, rows.shape[0]), replace=False)
        pooled.append(rows[np.sort(take)])
    data = np.ascontiguousarray(np.concatenate(pooled), np.float32)
    if data.shape[0] < k:
        raise RepresentationError(f"panther: {data.shape[0]} patch features cannot make {k} prototypes")
    faiss = import_faiss()
    kmeans = faiss.Kmeans(data.shape[1], k, niter=50, seed=int(seed), verbose=False)
    kmeans.train(data)
    return np.asarray(kmeans.centroids, np.float32)


def _load_panther(cohort, slide_ids, progress=None, cancel=None, seed: int = 0) -> LoadedRepresentation:
    usable, missing = [], {}
    for slide_id in slide_ids:
        try:
            next(_iter_patch_chunks(cohort, slide_id))
            usable.append(slide_id)
        except Exception as exc:  # noqa: BLE001
            missing[slide_id] = str(exc)
    if not usable:
        raise RepresentationError(f"panther: {_NO_PATCH}")
    protos = panther_prototypes(cohort, usable, seed=seed, cancel=cancel)
    vectors = []
    for i, slide_id in enumerate(usable):
        raise_if_cancelled(cancel, "computing PANTHER embeddings")
        vectors.append(_panther_streamed(cohort, slide_id, protos))
        _progress(progress, i + 1, len(usable))
    return LoadedRepresentation("panther", usable, np.stack(vectors), None, None, missing,
                                f"PANTHER (K={PANTHER_K}, one MAP-EM step) over patch features")


def _proalign_count(cohort, with_features):
    n = sum(cohort.proalign_path(s).exists() for s in with_features)
    note = "" if n else (f"ProAlign was not run on this cohort: run `slpd proalign {cohort.root} --vlm NAME "
                         "--checkpoint PATH --descriptions ORGAN`")
    return n, note


def _proalign_loader(dataset: str, name: str):
    def load(cohort, slide_ids, progress=None, cancel=None) -> LoadedRepresentation:
        import h5py

        vectors, kept, missing = [], [], {}
        for i, slide_id in enumerate(slide_ids):
            raise_if_cancelled(cancel, "loading ProAlign embeddings")
            path = cohort.proalign_path(slide_id)
            if not path.exists():
                missing[slide_id] = f"no ProAlign result (run `slpd proalign {cohort.root} ...`)"
                continue
            try:
                with h5py.File(path, "r") as fh:
                    if not bool(fh.attrs.get("complete", False)):
                        missing[slide_id] = "ProAlign result incomplete (run `slpd proalign` again)"
                        continue
                    vectors.append(np.asarray(fh[dataset][()], np.float32).reshape(-1))
            except (OSError, KeyError) as exc:
                missing[slide_id] = f"ProAlign result damaged ({exc})"
                continue
            kept.append(slide_id)
            _progress(progress, i + 1, len(slide_ids))
        if not kept:
            raise RepresentationError(
                f"{name}: ProAlign was not run on these slides; run `slpd proalign {cohort.root} --vlm NAME "
                "--checkpoint PATH --descriptions ORGAN`"
            )
        return LoadedRepresentation(name, kept, _stack(name, kept, vectors), None, None, missing,
                                    f"ProAlign slide embedding ({dataset})")

    return load


def _definitions(cohort) -> list[_Definition]:
    defs = [_region_definition(version, loader) for version, loader in region_embedding_sources(cohort)]
    defs += [
        _Definition("patch_mean", (VECTOR,), "mean of the patch features", _patch_count, _load_patch_mean),
        _Definition("prototype_set", (SET,), "the slide's prototypes, compared by the prototype set distance",
                    _prototype_count, _load_prototype_sets),
        _Definition("panther", (VECTOR,), "PANTHER slide embedding (SPEC section 5) from patch features",
                    _patch_count, _load_panther),
        _Definition("proalign_concat", (VECTOR,), "ProAlign slide embedding (concat over prototypes)",
                    _proalign_count, _proalign_loader("slide_embedding", "proalign_concat")),
        _Definition("proalign_mean", (VECTOR,), "ProAlign slide embedding (mean over prototypes)",
                    _proalign_count, _proalign_loader("slide_embedding_mean", "proalign_mean")),
    ]
    return defs


def list_representations(cohort) -> list[RepresentationInfo]:
    """Every representation this cohort could provide, with how many slides have it (cheap: no data read
    beyond a few file headers)."""
    with_features = _slides_with_features(cohort)
    out = []
    for d in _definitions(cohort):
        n, note = d.count(cohort, with_features)
        out.append(RepresentationInfo(d.name, d.kinds, d.description, n > 0, n, note))
    return out


def available_representations(cohort) -> list[str]:
    return [info.name for info in list_representations(cohort) if info.available]


def load_representation(cohort, name: str, slide_ids: list[str], progress=None, cancel=None,
                        seed: int = 0) -> LoadedRepresentation:
    """Load (or compute, for PANTHER) representation ``name`` for ``slide_ids``.

    Raises RepresentationError for an unknown name (listing the known ones) or one that was never computed
    (saying which command computes it). Slides without data are in ``missing``, with the reason.
    """
    defs = {d.name: d for d in _definitions(cohort)}
    if name not in defs:
        raise RepresentationError(
            f"unknown representation {name!r}; this cohort offers: {', '.join(defs)} (see `slpd evaluate "
            f"{cohort.root} --list`)"
        )
    d = defs[name]
    n, note = d.count(cohort, [s for s in slide_ids if cohort.features_path(s).exists()])
    if n == 0:
        raise RepresentationError(f"representation {name!r} was never computed for these slides: {note}")
    if name == "panther":
        return _load_panther(cohort, list(slide_ids), progress, cancel, seed=seed)
    return d.load(cohort, list(slide_ids), progress, cancel)
