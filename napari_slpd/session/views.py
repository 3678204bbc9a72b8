"""What the panels show about a session's slides: thumbnails, the names and colours of prototypes (one
authority: the cohort's annotations + the palette), pixel sizes and region sizes in words, embedding maps.
A mixin of :class:`napari_slpd.session.Session`."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from napari_slpd.cohort import SlideRecord
from napari_slpd.errors import PrototypeError, SlpdError
from napari_slpd.utils.files import atomic_path

from napari_slpd.session.settings import ProgressFn, PrototypeSettings, THUMBNAIL_PX
from napari_slpd.utils.device import kmeans_device

log = logging.getLogger(__name__)


class SessionViewsMixin:
    # -- a K tried on one slide (the Prototypes panel) -------------------------------------------------
    def trial_prototypes(self, slide_id: str, k: int, seed: int | None = None):
        """The slide's prototypes for another K (and seed) than the cohort's, computed and *not* cached: trying
        a K on one slide leaves the cohort's settings and every slide's cached prototypes as they are (the
        Prototypes panel shows them until the K is applied to the cohort)."""
        from napari_slpd.prototypes.cache import compute_slide_prototypes

        ps = self.settings.prototypes
        PrototypeSettings(k=int(k))  # validates K with the settings' own message
        data = self.region_data(slide_id)  # raises FeatureStoreError when there are no features
        protos = compute_slide_prototypes(
            self.cohort, slide_id, k=int(k), seed=int(ps.seed if seed is None else seed), niter=int(ps.niter),
            nredo=int(ps.nredo), min_regions=ps.min_regions, device=kmeans_device(self.settings.features.device),
            save=False,
        )
        if len(protos.assignments) != len(data):
            raise PrototypeError(f"the features of {slide_id} changed while its prototypes were computed; try again")
        return protos

    def has_cached_prototypes(self) -> bool:
        """Whether any slide of the cohort has prototypes in the cache (for any settings): changing K or the
        seed then makes them stale."""
        folders = dict.fromkeys([self.cohort.prototypes_path("_").parent, self.cohort.root / "prototypes"])
        try:
            return any(any(folder.glob("*.h5")) for folder in folders)
        except OSError:
            return False

    # -- thumbnails ------------------------------------------------------------------------------------
    def thumbnail(self, slide_id: str, max_px: int = THUMBNAIL_PX) -> np.ndarray:
        """RGB uint8 thumbnail (longer side ``max_px``), cached as COHORT/thumbnails/<id>.png."""
        from PIL import Image

        path = self.cohort.thumbnail_path(slide_id)
        if path.exists():
            try:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
                if max(image.shape[:2]) == max_px or max(image.shape[:2]) < max_px:
                    return image
            except OSError:
                log.warning("thumbnail %s is unreadable; making it again", path)
        slide = self.open_slide(slide_id)
        try:
            image = slide.thumbnail(max_px)
        finally:
            slide.close()
        with atomic_path(path, suffix=".partial.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        return image

    # -- names and colours of prototypes (one authority: the cohort's annotations + the palette) -------
    def annotations(self):
        """The cohort's prototype names and colours (PrototypeAnnotations), read again when the file
        changed (the labeling panel, the CLI or propagation wrote it)."""
        from napari_slpd.labeling import PrototypeAnnotations

        with self._lock:
            if self._annotations is None:
                self._annotations = PrototypeAnnotations.load(self.cohort, self)
            else:
                try:
                    self._annotations.reload_if_changed()
                except SlpdError as exc:
                    log.warning("prototype names: %s", exc)
            return self._annotations

    def prototype_styles(self, slide_id: str, protos=None) -> tuple[dict[int, str], dict[int, str]]:
        """(names, '#rrggbb' colours) of every prototype of ``slide_id``: the stored ones, the palette's
        elsewhere, colours unique within the slide. What the layer, legend, hover, similar-slides detail
        and export all show."""
        from napari_slpd.labeling.palette import default_name, slide_colors

        if protos is None:
            protos = self.prototypes(slide_id, compute=False)
        try:
            return self.annotations().styles(slide_id, protos)
        except SlpdError as exc:  # a damaged names file: defaults, and say why in the log
            log.warning("prototype names of %s: %s", slide_id, exc)
            k = int(protos.k)
            return {i: default_name(i) for i in range(k)}, slide_colors(k)

    def neighbour_styles(self, query_slide: str, slide_id: str, pairs, protos=None, query_protos=None):
        """(names, colours) of a neighbour's prototypes shown next to its query: its own names, the colour
        of the query prototype each one is matched to (``pairs`` of (query k, own l))."""
        from napari_slpd.labeling.palette import neighbour_colors

        if protos is None:
            protos = self.prototypes(slide_id, compute=False)
        names, _ = self.prototype_styles(slide_id, protos)
        _, query_colors = self.prototype_styles(query_slide, query_protos)
        return names, neighbour_colors(query_colors, pairs, int(protos.k))

    def prototype_pairs(self, query_slide: str, slide_id: str) -> list[tuple[int, int, float]]:
        """(query k, neighbour l, cosine) of the optimal matching of two slides' prototypes."""
        from napari_slpd.similarity import match_prototypes

        a = self.prototypes(query_slide, compute=False)
        b = self.prototypes(slide_id, compute=False)
        return [(int(p.k), int(p.l), float(p.similarity)) for p in match_prototypes(a.centroids, b.centroids)]

    # -- pixel sizes and region sizes -------------------------------------------------------------------
    def file_pixel_size(self, slide_id: str):
        """(PixelSize the file states, (width, height)) of a slide, cached while the file is unchanged."""
        from napari_slpd.slides.slide import open_slide

        record = self.record(slide_id)
        try:
            stamp = record.path.stat().st_mtime_ns
        except OSError:
            stamp = None
        cached = self._pixel_sizes.get(slide_id)
        if cached is not None and cached[0] == (str(record.path), stamp):
            return cached[1]
        slide = open_slide(record.path)
        try:
            info = (slide.pixel_size, tuple(int(v) for v in slide.dimensions))
        finally:
            slide.close()
        self._pixel_sizes[slide_id] = ((str(record.path), stamp), info)
        return info

    def pixel_size_text(self, slide_id: str, file_pixel_size=None, record: SlideRecord | None = None
                        ) -> tuple[str, str, bool]:
        """(short text, explanation, usable) of a slide's pixel size as a person reads it: "0.499",
        "0.5 (set)", "unknown" or "implausible (264.58)", with the fix named in GUI words (``record``:
        the slide's record when the caller has it, e.g. for every row of a list)."""
        record = record if record is not None else self.record(slide_id)
        fix = ("select the slide and press 'Set pixel size' below (or choose 'Unknown pixel size: objective "
               "/ level0' in the Features panel)")
        if record.mpp is not None:
            text = f"{record.mpp:.4g} (set)"
            tip = f"pixel size set in this cohort: {record.mpp:g} µm/px ({record.mpp_source or 'user'})"
            if file_pixel_size is not None and file_pixel_size.raw is not None:
                tip += f"; the file states {file_pixel_size.raw:g} µm/px"
            return text, tip, True
        if file_pixel_size is None:
            return "…", "reading the slide's pixel size", True
        ps = file_pixel_size
        if ps.mpp is not None:
            return f"{ps.mpp:.4g}", f"{ps.mpp:g} µm/px as the slide file states it ({ps.source})", True
        if ps.source == "implausible" and ps.raw is not None:
            return (f"implausible ({ps.raw:.2f})",
                    f"the file states {ps.raw:g} µm/px, which no scanner produces (a 96-dpi default?); {fix}", False)
        return "unknown", f"the file states no pixel size; {fix}", False

    def largest_region_px(self, slide_ids: Sequence[str] | None = None, min_regions: int | None = None) -> int | None:
        """The largest region size (patch size x a power of two, at the settings' resolution) that fits
        ``min_regions`` (K by default) regions on each of ``slide_ids``; None when not even one patch fits
        or a pixel size is unknown."""
        from napari_slpd.slides.slide import resolve_pixel_size

        fs = self.settings.features
        need = int(min_regions or self.settings.prototypes.k)
        best = None
        for slide_id in (slide_ids if slide_ids is not None else self.slide_ids()):
            record = self.record(slide_id)
            try:
                ps, (w, h) = self.file_pixel_size(slide_id)
            except SlpdError:
                continue
            mpp = record.mpp if record.mpp is not None else ps.mpp
            if mpp is None and fs.mpp_fallback != "none":
                try:
                    mpp = resolve_pixel_size({}, mpp=None, mpp_fallback=fs.mpp_fallback).mpp
                except SlpdError:
                    mpp = None
            if mpp is None:
                return None
            w_t, h_t = w * mpp / fs.target_mpp, h * mpp / fs.target_mpp
            size = None
            r = int(fs.patch_px)
            while (w_t // r) * (h_t // r) >= need:
                size = r
                r *= 2
            if size is None:
                return None
            best = size if best is None else min(best, size)
        return best

    def slide_size_text(self, slide_id: str) -> str:
        """'2220 x 2967 px at 0.499 µm/px (1.1 x 1.5 mm)' for messages about region sizes."""
        record = self.record(slide_id)
        ps, (w, h) = self.file_pixel_size(slide_id)
        mpp = record.mpp if record.mpp is not None else ps.mpp
        if mpp is None:
            return f"{w} x {h} px (pixel size unknown)"
        return f"{w} x {h} px at {mpp:.3g} µm/px ({w * mpp / 1000:.1f} x {h * mpp / 1000:.1f} mm)"

    # -- embedding maps ---------------------------------------------------------------------------------
    def embedding_map(self, slide_ids: Sequence[str] | None = None, name: str | None = None,
                      progress: ProgressFn | None = None, cancel=None):
        """(EmbeddingMap, from_cache) of the regions of ``slide_ids`` (all slides with features)."""
        from napari_slpd.similarity.embedding_map import load_or_compute_map

        slide_ids = list(slide_ids) if slide_ids is not None else self.slides_with_features()
        if name is None:
            name = slide_ids[0] if len(slide_ids) == 1 else "cohort"
        datas = [self.region_data(s) for s in slide_ids]
        return load_or_compute_map(
            self.root, name, [(d.slide_id, d.settings_key, d.embeddings) for d in datas],
            self.settings.umap, cancel=cancel, progress=progress,
        )
