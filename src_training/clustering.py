"""Re-clustering at the start of every epoch after the warm-up (SPEC section 2, "Intra-slide clustering").

1. The teacher (eval mode) embeds every region on the center crop of its grid; the embedding is the
   L2-normalized 256-d bottleneck of the teacher head. Each process embeds a contiguous share of the
   regions and the shares are summed across processes.
2. Per slide, K-means into K prototypes (``napari_slpd.prototypes.compute_prototypes``: faiss, niter 10,
   nredo 5, seed 0), slides split across processes by slide index (slide s on process s mod W), results
   summed across processes. Slides with fewer than ``min_num_region`` regions get no prototypes and are left
   out of both prototype losses (and reported).
3. Similar slides: S(n, m) = the best one-to-one matching of the two prototype sets (the official code
   enumerates all K! permutations; ``napari_slpd.prototypes`` solves the same maximum exactly with the
   Hungarian algorithm), rows of the slide-by-slide matrix split across processes; each slide's r most
   similar other slides with prototypes are its neighbours (slides without prototypes never are).
4. For each prototype k of slide n and neighbour m, l* = argmax_l <c(n,k), c(m,l)> (``cross_assignment``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from napari_slpd.errors import PrototypeError
from src_training import distributed
from src_training.data import TokenGridIndex

log = logging.getLogger(__name__)


@dataclass
class ClusterResult:
    """Cluster state of one epoch, identical on every process."""

    epoch: int
    assignments: torch.Tensor  # [N] long: prototype of each region, -1 if its slide has no prototypes
    centroids: torch.Tensor  # [S, K, E] float32, L2-normalized rows (zeros without prototypes)
    has_prototypes: torch.Tensor  # [S] bool
    neighbours: torch.Tensor  # [S, r] long: nearest slides with prototypes, -1 = none
    neighbour_similarity: torch.Tensor  # [S, r] float32: S(n, m) of those neighbours (nan = none)
    neighbour_prototypes: torch.Tensor  # [S, K, r] long: l* of each prototype in each neighbour, -1 = none

    def to(self, device: torch.device) -> "ClusterResult":
        return ClusterResult(
            self.epoch,
            *(t.to(device) for t in (
                self.assignments, self.centroids, self.has_prototypes, self.neighbours,
                self.neighbour_similarity, self.neighbour_prototypes,
            )),
        )

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "assignments": self.assignments.cpu(),
            "centroids": self.centroids.cpu(),
            "has_prototypes": self.has_prototypes.cpu(),
            "neighbours": self.neighbours.cpu(),
            "neighbour_similarity": self.neighbour_similarity.cpu(),
            "neighbour_prototypes": self.neighbour_prototypes.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "ClusterResult":
        return cls(
            int(state["epoch"]),
            state["assignments"], state["centroids"], state["has_prototypes"], state["neighbours"],
            state["neighbour_similarity"], state["neighbour_prototypes"],
        )


@torch.no_grad()
def embed_regions(
    teacher,
    loader,
    n_items: int,
    embed_dim: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor | None:
    """[N, E] L2-normalized teacher bottleneck of every region (center crop), summed over processes.

    ``loader`` yields this process's share (``ShardSampler``). Returns None if ``should_stop`` fired.
    """
    was_training = teacher.training
    teacher.eval()
    out = torch.zeros(n_items, embed_dim, dtype=torch.float32, device=device)
    try:
        for grids, _slides, items in loader:
            if should_stop is not None and should_stop():
                return None
            grids = grids.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                _, bottleneck = teacher(grids)
            out[items.to(device)] = bottleneck.float()
    finally:
        teacher.train(was_training)
    distributed.all_reduce_sum(out)
    return out.cpu()


def cluster_slides(
    embeddings: torch.Tensor,
    index: TokenGridIndex,
    k: int,
    min_num_region: int,
    seed: int = 0,
    niter: int = 10,
    nredo: int = 5,
    device: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """(assignments [N], centroids [S, K, E], has_prototypes [S], excluded) with slides split across processes."""
    from napari_slpd.prototypes import compute_prototypes

    n_slides, embed_dim = index.n_slides, embeddings.shape[1]
    rank, world = distributed.rank(), distributed.world_size()
    # Summed across processes: each slide is filled in by exactly one process, zeros elsewhere.
    assignments = torch.zeros(len(index), dtype=torch.long)
    centroids = torch.zeros(n_slides, k, embed_dim, dtype=torch.float32)
    done = torch.zeros(n_slides, dtype=torch.long)
    failed = torch.zeros(n_slides, dtype=torch.long)
    for s in range(rank, n_slides, world):
        if index.counts[s] < min_num_region:
            continue
        begin, end = int(index.offsets[s]), int(index.offsets[s + 1])
        try:
            protos = compute_prototypes(
                embeddings[begin:end].numpy(), k=k, seed=seed, niter=niter, nredo=nredo, device=device
            )
        except PrototypeError as exc:
            log.warning("slide %s gets no prototypes this epoch: %s", index.slide_ids[s], exc)
            failed[s] = 1
            continue
        centroids[s] = torch.as_tensor(np.asarray(protos.centroids, dtype=np.float32))
        assignments[begin:end] = torch.as_tensor(np.asarray(protos.assignments, dtype=np.int64))
        done[s] = 1
    for tensor in (assignments, centroids, done, failed):
        distributed.all_reduce_sum(tensor)
    has_prototypes = done > 0
    region_has = has_prototypes[torch.as_tensor(index.slide_of)]
    assignments[~region_has] = -1
    excluded = []
    for s in range(n_slides):
        if not has_prototypes[s]:
            reason = "k-means failed" if failed[s] else f"fewer than {min_num_region} regions"
            excluded.append({"slide_id": index.slide_ids[s], "n_regions": int(index.counts[s]), "reason": reason})
    return assignments, centroids, has_prototypes, excluded


def slide_similarity_matrix(centroids: torch.Tensor, has_prototypes: torch.Tensor) -> torch.Tensor:
    """[S, S] S(n, m) between slides with prototypes (-inf on the diagonal and for slides without).

    Rows are split across processes (row n on process n mod W) and summed; each row is one call of
    ``batch_set_similarity`` (exact optimal matching of the row's set against all others).
    """
    from napari_slpd.similarity import batch_set_similarity

    n_slides = centroids.shape[0]
    eligible = torch.nonzero(has_prototypes).flatten()
    block = torch.zeros(len(eligible), len(eligible), dtype=torch.float64)
    if len(eligible) >= 2:
        sets = centroids[eligible].numpy()
        rank, world = distributed.rank(), distributed.world_size()
        for a in range(rank, len(eligible), world):
            block[a] = torch.as_tensor(np.asarray(batch_set_similarity(sets[a], sets), dtype=np.float64))
        distributed.all_reduce_sum(block)
    sim = torch.full((n_slides, n_slides), float("-inf"))
    sim[eligible[:, None], eligible[None, :]] = block.float()
    sim.fill_diagonal_(float("-inf"))
    return sim


def find_neighbours(
    centroids: torch.Tensor, has_prototypes: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(neighbours [S, r], their S(n, m) [S, r], l* [S, K, r]); -1 / nan where a slide has no neighbour."""
    from napari_slpd.similarity import cross_assignment

    n_slides, k, _ = centroids.shape
    sim = slide_similarity_matrix(centroids, has_prototypes)
    take = min(r, n_slides)
    values, idx = torch.topk(sim, take, dim=1) if n_slides else (sim[:, :0], sim[:, :0].long())
    neighbours = torch.full((n_slides, r), -1, dtype=torch.long)
    similarity = torch.full((n_slides, r), float("nan"))
    valid = torch.isfinite(values) & has_prototypes[:, None]
    neighbours[:, :take] = torch.where(valid, idx, torch.full_like(idx, -1))
    similarity[:, :take] = torch.where(valid, values, torch.full_like(values, float("nan")))
    neighbour_prototypes = torch.full((n_slides, k, r), -1, dtype=torch.long)
    arrays = centroids.numpy()
    for s in range(n_slides):
        for j in range(r):
            m = int(neighbours[s, j])
            if m >= 0:
                neighbour_prototypes[s, :, j] = torch.as_tensor(
                    np.asarray(cross_assignment(arrays[s], arrays[m]), dtype=np.int64)
                )
    return neighbours, similarity, neighbour_prototypes


def recluster(
    epoch: int,
    teacher,
    eval_loader,
    index: TokenGridIndex,
    cluster_cfg,
    embed_dim: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    should_stop: Callable[[], bool] | None = None,
    kmeans_device: str = "auto",
) -> tuple[ClusterResult, dict] | None:
    """Embed, cluster and match for one epoch: (result on ``device``, statistics for the event stream)."""
    started = time.perf_counter()
    embeddings = embed_regions(teacher, eval_loader, len(index), embed_dim, device, autocast_dtype, should_stop)
    if embeddings is None:
        return None
    assignments, centroids, has_prototypes, excluded = cluster_slides(
        embeddings, index, cluster_cfg.num_clusters, cluster_cfg.min_num_region,
        seed=cluster_cfg.seed, niter=cluster_cfg.niter, nredo=cluster_cfg.nredo, device=kmeans_device,
    )
    neighbours, neighbour_sim, neighbour_protos = find_neighbours(centroids, has_prototypes, cluster_cfg.neighbours)
    result = ClusterResult(epoch, assignments, centroids, has_prototypes, neighbours, neighbour_sim, neighbour_protos)
    stats = cluster_statistics(result, embeddings, index, cluster_cfg.num_clusters, excluded)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return result.to(device), stats


def cluster_statistics(
    result: ClusterResult, embeddings: torch.Tensor, index: TokenGridIndex, k: int, excluded: list[dict]
) -> dict:
    regions = result.assignments >= 0
    slide_of = torch.as_tensor(index.slide_of)
    sizes = []
    for s in torch.nonzero(result.has_prototypes).flatten().tolist():
        begin, end = int(index.offsets[s]), int(index.offsets[s + 1])
        sizes.extend(torch.bincount(result.assignments[begin:end], minlength=k).tolist())
    if regions.any():
        own = result.centroids[slide_of[regions], result.assignments[regions]]
        mean_similarity = float((embeddings[regions] * own).sum(-1).mean())
    else:
        mean_similarity = float("nan")
    first = result.neighbour_similarity[:, 0] if result.neighbour_similarity.numel() else torch.empty(0)
    has_neighbour = torch.isfinite(first)
    return {
        "epoch": result.epoch,
        "k": k,
        "n_slides_clustered": int(result.has_prototypes.sum()),
        "excluded": excluded,
        "cluster_size_min": min(sizes) if sizes else None,
        "cluster_size_mean": float(np.mean(sizes)) if sizes else None,
        "cluster_size_max": max(sizes) if sizes else None,
        "mean_similarity": mean_similarity,
        "mean_neighbour_similarity": float(first[has_neighbour].mean()) if has_neighbour.any() else None,
        "mean_prototype_distance": float((k - first[has_neighbour]).mean()) if has_neighbour.any() else None,
        "n_without_neighbour": int((result.has_prototypes & ~has_neighbour).sum()),
    }
