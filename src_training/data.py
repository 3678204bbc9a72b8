"""Training data: the cached token grids of a cohort, the multi-crop views and a resumable batch order.

Token grids stay on disk: the index holds only (slide, row) pairs, and each item is read from the slide's
HDF5 feature file when it is needed (one h5py handle per worker process, a bounded number kept open).

Randomness is tied to data, not to processes: every epoch has one permutation of all regions and one
augmentation seed per position, both drawn from ``(seed, epoch)``. A global batch is a contiguous slice of
that permutation and process r takes the r-th part of it, so 1 process with batch 2B sees exactly the
same regions and crops as 2 processes with batch B each, the number of data-loader workers changes
nothing, and resuming at step s of an epoch continues with the very batches an uninterrupted run would use.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from napari_slpd.errors import FeatureStoreError, SlpdError

log = logging.getLogger(__name__)

# Open HDF5 files kept per process and dataset (one file descriptor each): with W loader workers a run holds
# at most W x MAX_OPEN_FILES of them, well below the usual limit of 1024.
MAX_OPEN_FILES = 48


@dataclass
class TokenGridIndex:
    """Which regions the run trains on: slide i owns dataset items offsets[i] .. offsets[i+1]-1."""

    slide_ids: list[str]
    paths: list[Path]
    counts: np.ndarray  # [S] regions per slide
    token_dim: int
    grid: int
    missing: list[dict] = field(default_factory=list)  # [{"slide_id", "reason"}] cohort slides left out

    def __post_init__(self):
        self.counts = np.asarray(self.counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.slide_of = np.repeat(np.arange(len(self.slide_ids), dtype=np.int64), self.counts)
        self.row_of = np.arange(int(self.offsets[-1]), dtype=np.int64) - self.offsets[self.slide_of]

    @property
    def n_slides(self) -> int:
        return len(self.slide_ids)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_cohort(cls, cohort, slide_ids: list[str] | None = None) -> "TokenGridIndex":
        """Index every cohort slide with a complete feature file; raises if none has token grids."""
        ids = slide_ids if slide_ids is not None else cohort.slide_ids()
        if not ids:
            raise SlpdError(f"cohort {cohort.root} has no slides; add slides and run `slpd extract` first")
        return cls.from_files([(sid, cohort.features_path(sid)) for sid in ids], where=str(cohort.root))

    @classmethod
    def from_files(cls, files: list[tuple[str, str | os.PathLike]], where: str = "the given files") -> "TokenGridIndex":
        from napari_slpd.features.store import FeatureStore

        slide_ids, paths, counts, missing = [], [], [], []
        shape: tuple[int, int] | None = None
        for slide_id, path in files:
            try:
                with FeatureStore.open(path) as store:
                    n, dim, grid = store.n_regions, store.token_dim, store.grid_size
            except FeatureStoreError as exc:
                missing.append({"slide_id": slide_id, "reason": str(exc)})
                continue
            if n == 0:
                missing.append({"slide_id": slide_id, "reason": "no regions (slide smaller than one region?)"})
                continue
            if shape is None:
                shape = (dim, grid)
            elif (dim, grid) != shape:
                raise FeatureStoreError(
                    f"{path} holds token grids [{dim}, {grid}, {grid}] but earlier slides hold "
                    f"[{shape[0]}, {shape[1]}, {shape[1]}]; extract every slide of a training cohort with the "
                    "same patch encoder and region/patch sizes"
                )
            slide_ids.append(slide_id)
            paths.append(Path(path))
            counts.append(n)
        if not slide_ids:
            reasons = "; ".join(f"{m['slide_id']}: {m['reason']}" for m in missing[:5])
            raise FeatureStoreError(f"no slide of {where} has cached token grids to train on ({reasons})")
        for m in missing:
            log.warning("slide %s left out of training: %s", m["slide_id"], m["reason"])
        return cls(slide_ids, paths, np.array(counts), shape[0], shape[1], missing)


class _OpenFiles:
    """Per-process LRU of open HDF5 files; handles are never shared across a fork."""

    def __init__(self, capacity: int = MAX_OPEN_FILES):
        self.capacity = capacity
        self._files: OrderedDict[Path, object] = OrderedDict()
        self._pid = os.getpid()

    def tokens(self, path: Path):
        import h5py

        if self._pid != os.getpid():  # forked into a data-loader worker: start with a clean table
            self._files = OrderedDict()
            self._pid = os.getpid()
        handle = self._files.get(path)
        if handle is None:
            handle = h5py.File(path, "r")
            self._files[path] = handle
            while len(self._files) > self.capacity:
                _, old = self._files.popitem(last=False)
                old.close()
        else:
            self._files.move_to_end(path)
        return handle["region_tokens"]

    def close(self) -> None:
        for handle in self._files.values():
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - closing during interpreter shutdown may fail harmlessly
                pass
        self._files.clear()

    def __getstate__(self):  # pickled into spawned workers: they open their own files
        return {"capacity": self.capacity}

    def __setstate__(self, state):
        self.__init__(state["capacity"])


def random_crop_flip(grid: torch.Tensor, size: int, flip_prob: float, gen: torch.Generator) -> torch.Tensor:
    """torchvision RandomCrop(size) + RandomHorizontalFlip(flip_prob) on a [D, G, G] grid, drawn from ``gen``."""
    height, width = grid.shape[-2:]
    top = int(torch.randint(0, height - size + 1, (1,), generator=gen))
    left = int(torch.randint(0, width - size + 1, (1,), generator=gen))
    crop = grid[..., top : top + size, left : left + size]
    if float(torch.rand(1, generator=gen)) < flip_prob:
        crop = crop.flip(-1)
    return crop


def center_crop(grid: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision CenterCrop(size) on a [D, G, G] grid (the offset rounds like torchvision's)."""
    height, width = grid.shape[-2:]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return grid[..., top : top + size, left : left + size]


class MultiCropViews:
    """The SLPD views of one token grid: n_global RandomCrop(global) + flip, then n_local RandomCrop(local) + flip."""

    def __init__(self, global_crop: int, local_crop: int, n_global: int = 2, n_local: int = 8, flip_prob: float = 0.5):
        self.global_crop, self.local_crop = global_crop, local_crop
        self.n_global, self.n_local = n_global, n_local
        self.flip_prob = flip_prob

    def __call__(self, grid: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        views = [random_crop_flip(grid, self.global_crop, self.flip_prob, gen) for _ in range(self.n_global)]
        views += [random_crop_flip(grid, self.local_crop, self.flip_prob, gen) for _ in range(self.n_local)]
        return [v.contiguous() for v in views]


class TokenGridDataset(Dataset):
    """Items are keyed by ``(dataset index, augmentation seed)`` as the samplers below yield them.

    With ``views`` each item is ``(list of view tensors, slide index, dataset index)``; without, it is the
    center crop of size ``eval_crop`` (for the clustering pass): ``(tensor, slide index, dataset index)``.
    """

    def __init__(self, index: TokenGridIndex, views: MultiCropViews | None = None, eval_crop: int | None = None):
        if views is None and eval_crop is None:
            raise ValueError("give views (training) or eval_crop (embedding pass)")
        self.index = index
        self.views = views
        self.eval_crop = eval_crop
        self._files = _OpenFiles()

    def __len__(self) -> int:
        return len(self.index)

    def read_grid(self, item: int) -> torch.Tensor:
        slide = int(self.index.slide_of[item])
        row = int(self.index.row_of[item])
        path = self.index.paths[slide]
        try:
            array = np.asarray(self._files.tokens(path)[row], dtype=np.float32)
        except (OSError, KeyError) as exc:
            raise FeatureStoreError(
                f"cannot read region {row} of {path} ({exc}); the feature file changed or is damaged, "
                "extract this slide again"
            ) from exc
        return torch.from_numpy(array)

    def __getitem__(self, key):
        item, aug_seed = key if isinstance(key, tuple) else (key, 0)
        grid = self.read_grid(item)
        slide = int(self.index.slide_of[item])
        if self.views is None:
            return center_crop(grid, self.eval_crop).contiguous(), slide, item
        gen = torch.Generator().manual_seed(int(aug_seed))
        return self.views(grid, gen), slide, item

    def close(self) -> None:
        self._files.close()


def collate_views(batch):
    """[(views, slide, item)] -> (list over views of [B, D, c, c], slides [B], items [B])."""
    views = [torch.stack([sample[0][v] for sample in batch]) for v in range(len(batch[0][0]))]
    slides = torch.tensor([sample[1] for sample in batch], dtype=torch.long)
    items = torch.tensor([sample[2] for sample in batch], dtype=torch.long)
    return views, slides, items


def collate_eval(batch):
    grids = torch.stack([sample[0] for sample in batch])
    slides = torch.tensor([sample[1] for sample in batch], dtype=torch.long)
    items = torch.tensor([sample[2] for sample in batch], dtype=torch.long)
    return grids, slides, items


def epoch_order(n_items: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(permutation of the items, augmentation seed per position) of one epoch; the same on every process."""
    rng = np.random.default_rng([seed, epoch, 0x51D])
    permutation = rng.permutation(n_items)
    aug_seeds = rng.integers(0, 2**62, size=n_items, dtype=np.int64)
    return permutation, aug_seeds


class EpochBatchSampler(Sampler):
    """Batches of ``(item, aug_seed)`` for one process; the last incomplete global batch is dropped.

    ``set_epoch(epoch, start_step)`` chooses the epoch and where to start in it (resume mid-epoch).
    """

    def __init__(self, n_items: int, batch_per_process: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n_items = n_items
        self.batch = batch_per_process
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_batch = batch_per_process * world_size
        self.steps_per_epoch = n_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise SlpdError(
                f"the cohort has {n_items} regions, fewer than one global batch of {self.global_batch} "
                f"({batch_per_process} per process x {world_size}); lower --batch-size or add slides"
            )
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        permutation, aug_seeds = epoch_order(self.n_items, self.seed, self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            begin = step * self.global_batch + self.rank * self.batch
            positions = range(begin, begin + self.batch)
            yield [(int(permutation[p]), int(aug_seeds[p])) for p in positions]


class ShardSampler(Sampler):
    """Batches of this process's contiguous share of all items, in order (the embedding pass)."""

    def __init__(self, n_items: int, batch_size: int, rank: int = 0, world_size: int = 1):
        bounds = np.linspace(0, n_items, world_size + 1).round().astype(np.int64)
        self.items = np.arange(bounds[rank], bounds[rank + 1])
        self.batch = batch_size

    def __len__(self) -> int:
        return (len(self.items) + self.batch - 1) // self.batch

    def __iter__(self):
        for start in range(0, len(self.items), self.batch):
            yield [(int(i), 0) for i in self.items[start : start + self.batch]]
