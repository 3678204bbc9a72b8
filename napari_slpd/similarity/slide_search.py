"""The similar-slides search of the CLI and the panels: its one result type and its two questions.

``search_slides`` ranks the comparable slides of a cohort index by the prototype set distance to a slide
(the whole-slide query); ``rank_by_prototype`` ranks slides by their best match to one prototype of a
slide (what a click on a region asks: where else is this tissue pattern?). Which slides are comparable
(prototypes current for the settings in use) is the caller's knowledge: :class:`napari_slpd.session.Session`
decides it, for ``slpd similar`` and the Similar slides panel alike.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np

from napari_slpd.similarity.matching import PrototypePair


@dataclass
class SlideMatch:
    """One ranked slide: ``distance`` (max(K, L) - S for a whole-slide query, 1 - cosine for a prototype
    query), ``similarity`` (S, or the cosine), ``pairs`` the matched prototypes (query prototype k, this
    slide's prototype l), most similar first, with their cosines in ``pair_similarities``; ``n_prototypes``
    of this slide; ``rank`` from 1; ``exact``: whether the ranking it belongs to is exact (always, today)."""

    slide_id: str
    distance: float
    similarity: float
    pairs: list[tuple[int, int]]
    pair_similarities: list[float] = field(default_factory=list)
    n_prototypes: int = 0
    rank: int = 0
    exact: bool = True

    @classmethod
    def from_prototype_pairs(cls, slide_id: str, distance: float, similarity: float,
                             pairs: Iterable[PrototypePair], **extra) -> SlideMatch:
        pairs = list(pairs)
        return cls(slide_id, float(distance), float(similarity), [(int(p.k), int(p.l)) for p in pairs],
                   [float(p.similarity) for p in pairs], **extra)

    @property
    def prototype_pairs(self) -> list[PrototypePair]:
        return [PrototypePair(k, l, s) for (k, l), s in zip(self.pairs, self.pair_similarities)]

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "slide_id": self.slide_id,
            "distance": round(self.distance, 6),
            "similarity": round(self.similarity, 6),
            "n_prototypes": self.n_prototypes,
            "exact": self.exact,
            "pairs": [{"query": k, "match": l, "similarity": round(s, 6)}
                      for (k, l), s in zip(self.pairs, self.pair_similarities)],
        }


def search_slides(index, slide_id: str, comparable: Collection[str], n: int,
                  method: str | None = None) -> list[SlideMatch]:
    """The ``n`` slides of ``index`` nearest to ``slide_id`` by prototype set distance, among
    ``comparable`` only (slides whose prototypes were made for other settings are not comparable)."""
    exclude = [s for s in index.slide_ids if s not in comparable]
    return index.query(slide_id, n=n, exclude=exclude, method=method)  # the default search is exact (bounded)


def rank_by_prototype(query_centroids, k: int, candidates: Iterable[tuple[str, object]],
                      n: int) -> list[SlideMatch]:
    """Slides ranked by their best match to prototype ``k`` of a query set [K, E]: distance = 1 - the
    largest cosine between that prototype and one of the slide's prototypes. ``candidates``: (slide id,
    centroids [L, E]) of the comparable slides, the query slide left out; ties by slide id."""
    q = np.asarray(query_centroids, dtype=np.float32)[int(k)]
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    matches = []
    for slide_id, centroids in candidates:
        c = np.asarray(centroids, dtype=np.float32)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        if c.shape[1] != q.shape[0] or not len(c):
            continue
        cos = c @ q
        best = int(np.argmax(cos))
        matches.append(SlideMatch(slide_id, float(1.0 - cos[best]), float(cos[best]), [(int(k), best)],
                                  [float(cos[best])], n_prototypes=len(c)))
    matches.sort(key=lambda m: (m.distance, m.slide_id))
    matches = matches[: int(n)]
    for rank, match in enumerate(matches, start=1):
        match.rank = rank
    return matches
