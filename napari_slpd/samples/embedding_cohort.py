"""Synthetic cohorts made of embeddings (no slides, no encoders): for tests, benchmarks and trying the
evaluation in seconds.

Slides look like real cohorts in the ways that matter to slide-level evaluation: every slide mixes tissue
types shared across the cohort (a class shifts the mixture, it does not own a tissue type), embeddings
carry per-slide stain shifts and per-region noise, several slides share a case, and some slides are
near-duplicates of others (re-scans), which makes near-ties in distances.

```python
from napari_slpd.samples.embedding_cohort import SyntheticCohortSpec, synthetic_slides, write_embedding_cohort
spec = SyntheticCohortSpec(n_slides=60, n_classes=3, separation=1.0, seed=0)
slides = synthetic_slides(spec)          # SyntheticSlide(slide_id, case_id, label, composition, embeddings, ...)
write_embedding_cohort(root, spec)       # COHORT/features/*.h5, prototypes, labels.csv, cohort.json
sets, labels, cases = synthetic_prototype_sets(n_slides=10_000, k=16, dim=192, n_classes=4, seed=0)
```
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class SyntheticCohortSpec:
    n_slides: int = 60
    n_classes: int = 3
    n_tissue_types: int = 8
    slides_per_case: int = 2
    regions: tuple[int, int] = (24, 48)  # region count range per slide
    embed_dim: int = 16
    token_dim: int = 8
    grid: int = 2  # patches per region side
    separation: float = 1.0  # 0: labels independent of composition
    noise: float = 0.35
    k: int = 4  # prototypes per slide
    seed: int = 0
    survival: bool = True
    hazard_scale: float = 2.0  # log-hazard per unit of composition . risk weights (higher: survival follows composition)


@dataclass
class SyntheticSlide:
    slide_id: str
    case_id: str
    label: int
    composition: np.ndarray  # [T] tissue-type fractions
    embeddings: np.ndarray  # [M, E]
    patch_features: np.ndarray  # [M * G * G, D]
    time: float
    event: int


def _tissue_model(spec: SyntheticCohortSpec, rng):
    centres = rng.normal(0, 1, (spec.n_tissue_types, spec.embed_dim))
    patch_centres = rng.normal(0, 1, (spec.n_tissue_types, spec.token_dim))
    # Each class prefers a few tissue types; all types occur in every class (shared tissue).
    base = np.full(spec.n_tissue_types, 1.0)
    preferences = []
    for c in range(spec.n_classes):
        pref = base.copy()
        favoured = rng.choice(spec.n_tissue_types, size=2, replace=False)
        pref[favoured] += 6.0 * spec.separation
        preferences.append(pref)
    return centres, patch_centres, np.array(preferences)


def synthetic_slides(spec: SyntheticCohortSpec) -> list[SyntheticSlide]:
    rng = np.random.default_rng(spec.seed)
    centres, patch_centres, prefs = _tissue_model(spec, rng)
    risk_weights = rng.normal(0, 1, spec.n_tissue_types)  # composition -> hazard
    n_cases = max(1, int(np.ceil(spec.n_slides / spec.slides_per_case)))
    case_labels = np.arange(n_cases) % spec.n_classes
    rng.shuffle(case_labels)
    slides = []
    G2 = spec.grid * spec.grid
    for i in range(spec.n_slides):
        case = i // spec.slides_per_case
        label = int(case_labels[case])
        near_duplicate = i % spec.slides_per_case == 1 and slides and rng.random() < 0.3
        if near_duplicate:
            prev = slides[-1]
            composition = prev.composition
            emb = prev.embeddings + rng.normal(0, 1e-3, prev.embeddings.shape)  # a re-scan of the same block
            patches = prev.patch_features + rng.normal(0, 1e-3, prev.patch_features.shape)
        else:
            composition = rng.dirichlet(prefs[label] * 1.5)
            m = int(rng.integers(spec.regions[0], spec.regions[1] + 1))
            types = rng.choice(spec.n_tissue_types, size=m, p=composition)
            stain = rng.normal(0, 0.25, spec.embed_dim)
            emb = centres[types] + stain + rng.normal(0, spec.noise, (m, spec.embed_dim))
            patch_types = np.repeat(types, G2)
            patches = patch_centres[patch_types] + rng.normal(0, spec.noise, (m * G2, spec.token_dim))
        hazard = float(np.exp(composition @ risk_weights * spec.hazard_scale))
        time = float(rng.exponential(24.0 / hazard))
        censor = float(rng.exponential(48.0))
        slides.append(SyntheticSlide(
            f"slide_{i:05d}", f"case_{case:05d}", label, composition, emb.astype(np.float32),
            patches.astype(np.float32), round(min(time, censor), 3), int(time <= censor),
        ))
    return slides


def write_labels_csv(path: Path, slides: list[SyntheticSlide], class_names: list[str] | None = None,
                     survival: bool = True) -> Path:
    names = class_names or [f"class_{c}" for c in range(max(s.label for s in slides) + 1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "case_id", "class"] + (["time", "event"] if survival else []))
        for s in slides:
            writer.writerow([s.slide_id, s.case_id, names[s.label]] + ([s.time, s.event] if survival else []))
    return path


def write_embedding_cohort(root, spec: SyntheticCohortSpec, prototypes: bool = True) -> tuple[object, Path]:
    """Write a cohort of synthetic feature files (+ prototypes, + labels.csv at ROOT/labels.csv).
    Returns (Cohort, labels path). Slides are registered with a placeholder path (no image)."""
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.store import RegionChunk, StoreLayout, write_store
    from napari_slpd.utils.files import atomic_write_json

    root = Path(root)
    cohort = Cohort(root)
    slides = synthetic_slides(spec)
    registry = {"slides": {}}
    G = spec.grid
    for s in slides:
        m = s.embeddings.shape[0]
        layout = StoreLayout(m, spec.token_dim, G, spec.embed_dim, token_dtype="float32", patch_features=True)
        tokens = s.patch_features.reshape(m, G, G, spec.token_dim).transpose(0, 3, 1, 2)
        coords = np.stack([np.arange(m) % 8 * 256, np.arange(m) // 8 * 256], 1).astype(np.int64)
        patch_coords = np.repeat(coords, G * G, axis=0)
        chunk = RegionChunk(np.ascontiguousarray(tokens), s.embeddings, coords, np.ones(m, np.float32),
                            s.patch_features, patch_coords)
        settings = {"synthetic": True, "seed": spec.seed}
        write_store(cohort.features_path(s.slide_id), layout, settings, chunk,
                    attrs={"slide_id": s.slide_id, "region_size_level0": 256.0, "region_encoder": "synthetic"},
                    coords_attrs={"patch_size_level0": 256.0 / G, "patch_level": 0})
        registry["slides"][s.slide_id] = {"path": f"slides/{s.slide_id}.svs"}
    atomic_write_json(cohort.registry_path, registry)
    if prototypes:
        from napari_slpd.prototypes.cache import compute_cohort_prototypes

        compute_cohort_prototypes(cohort, k=spec.k, device="cpu")
    labels = write_labels_csv(root / "labels.csv", slides, survival=spec.survival)
    return cohort, labels


def synthetic_prototype_sets(n_slides: int, k: int = 16, dim: int = 192, n_classes: int = 4,
                             n_tissue_types: int = 24, seed: int = 0, noise: float = 0.3,
                             slides_per_case: int = 3) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Prototype sets [k, dim] (L2-normalized) of ``n_slides`` slides without writing anything, for the
    evaluation benchmark: (sets, labels [N], cases [N]). Prototypes are noisy copies of shared tissue-type
    centres (a class prefers some types); every tenth slide is a near-duplicate of the one before it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_tissue_types, dim))
    prefs = np.ones((n_classes, n_tissue_types))
    for c in range(n_classes):
        prefs[c, rng.choice(n_tissue_types, size=4, replace=False)] += 4.0
    prefs /= prefs.sum(1, keepdims=True)
    n_cases = int(np.ceil(n_slides / slides_per_case))
    case_labels = rng.integers(0, n_classes, n_cases)
    sets, labels, cases = [], np.zeros(n_slides, np.int64), np.empty(n_slides, dtype=object)
    for i in range(n_slides):
        case = i // slides_per_case
        labels[i] = case_labels[case]
        cases[i] = f"case_{case:05d}"
        if i % 10 == 9 and i % slides_per_case != 0:
            protos = sets[-1] + rng.normal(0, 1e-4, sets[-1].shape)
        else:
            types = rng.choice(n_tissue_types, size=k, p=prefs[labels[i]])
            protos = centres[types] + rng.normal(0, noise, (k, dim)) + rng.normal(0, 0.1, dim)
        protos = protos / np.linalg.norm(protos, axis=1, keepdims=True)
        sets.append(protos.astype(np.float32))
    return sets, labels, cases
