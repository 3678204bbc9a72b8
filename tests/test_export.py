"""Export of prototype regions: exact lattice outlines (shells, holes, diagonal contacts), QuPath GeoJSON
that re-reads to the same cells, and the palette label-map TIFF with resolution tags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from napari_slpd.export import (ClassStyle, ExportError, mask_to_polygons, prototype_geojson, read_geojson,
                                write_geojson, write_label_map_tiff)


def _signed_area(ring) -> float:
    ring = np.asarray(ring, dtype=np.float64)
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _inside(x, y, ring) -> bool:
    ring = np.asarray(ring, dtype=np.float64)
    xs, ys, xe, ye = ring[:-1, 0], ring[:-1, 1], ring[1:, 0], ring[1:, 1]
    crosses = (ys > y) != (ye > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = xs + (y - ys) * (xe - xs) / (ye - ys)
    return bool(np.count_nonzero(crosses & (x < x_at)) % 2)


def _covers(polygon, x, y) -> bool:
    return _inside(x, y, polygon[0]) and not any(_inside(x, y, hole) for hole in polygon[1:])


def _rasterize(polygons, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=int)
    for r in range(shape[0]):
        for c in range(shape[1]):
            out[r, c] = sum(_covers(p, c + 0.5, r + 0.5) for p in polygons)
    return out


def test_square_with_hole_and_island():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    mask[2:5, 2:5] = False  # a 3x3 hole...
    mask[3, 3] = True  # ...with an island in it
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    ring_big = next(p for p in polygons if len(p) == 2)
    assert _signed_area(ring_big[0]) == 25 and _signed_area(ring_big[1]) == -9
    assert len(ring_big[0]) == 5 and len(ring_big[1]) == 5  # only the corners are kept
    island = next(p for p in polygons if len(p) == 1)
    assert _signed_area(island[0]) == 1
    np.testing.assert_array_equal(_rasterize(polygons, mask.shape), mask.astype(int))


def test_diagonal_cells_are_separate_polygons_and_pinch_rings_split():
    checker = np.array([[1, 0], [0, 1]], bool)
    polygons = mask_to_polygons(checker)
    assert len(polygons) == 2 and all(len(p) == 1 and _signed_area(p[0]) == 1 for p in polygons)
    # A ring of cells whose inner cell reaches the outside only through a corner: one polygon whose hole
    # touches the shell at that corner (OGC-valid), never a shell ring that touches itself.
    ring = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]], bool)
    polygons = mask_to_polygons(ring)
    assert len(polygons) == 1 and len(polygons[0]) == 2
    assert _signed_area(polygons[0][0]) == 8 and _signed_area(polygons[0][1]) == -1
    for r in polygons[0]:
        pts = [tuple(p) for p in r[:-1]]
        assert len(pts) == len(set(pts))
    np.testing.assert_array_equal(_rasterize(polygons, ring.shape), ring.astype(int))


@pytest.mark.parametrize("seed", range(12))
def test_random_masks_are_covered_exactly(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(3, 14, 2))
    mask = rng.random(shape) < rng.uniform(0.2, 0.8)
    polygons = mask_to_polygons(mask)
    assert len(polygons) == ndimage.label(mask)[1]  # one polygon per 4-connected component
    area = sum(_signed_area(p[0]) + sum(_signed_area(h) for h in p[1:]) for p in polygons)
    assert area == mask.sum()
    for p in polygons:
        assert _signed_area(p[0]) > 0 and all(_signed_area(h) < 0 for h in p[1:])
        for ring in p:  # simple rings: no corner visited twice
            assert len({tuple(v) for v in ring[:-1]}) == len(ring) - 1
    np.testing.assert_array_equal(_rasterize(polygons, mask.shape), mask.astype(int))
    # OGC-valid as a whole (what QuPath's JTS checks): shells and holes may touch at points only
    import shapely

    assert shapely.MultiPolygon([shapely.Polygon(p[0], p[1:]) for p in polygons]).is_valid


def _lattice(rows=5, cols=7, size=300, origin=(40, 10), drop=0.15, seed=0):
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    keep = rng.random(rows * cols) >= drop
    coords = np.stack([origin[0] + cc.ravel() * size, origin[1] + rr.ravel() * size], 1)[keep].astype(np.int64)
    labels = rng.integers(0, 3, len(coords))
    return coords, labels


STYLES = {0: ClassStyle("Tumor", "#c81e1e"), 1: ClassStyle("Stroma", "#1ec832"), 2: ClassStyle("Necrosis", "#323232")}


def test_geojson_is_qupath_shaped_and_rereads_to_the_same_regions(tmp_path):
    coords, labels = _lattice()
    size, dims = 300, (40 + 7 * 300 - 120, 10 + 5 * 300)  # the last column sticks out of the slide
    collection = prototype_geojson(coords, size, labels, STYLES, slide_id="s1", slide_dimensions=dims)
    path = write_geojson(tmp_path / "s1.geojson", collection)
    features = read_geojson(path)
    assert json.loads(path.read_text())["type"] == "FeatureCollection"
    assert {f["properties"]["classification"]["name"] for f in features} == {s.name for s in STYLES.values()}
    for feature in features:
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        k = int(props["metadata"]["prototype"])
        assert props["classification"] == {"name": STYLES[k].name,
                                           "color": [int(STYLES[k].color[i:i + 2], 16) for i in (1, 3, 5)]}
        geom = feature["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        pts = np.concatenate([np.asarray(ring) for poly in polys for ring in poly])
        assert pts[:, 0].min() >= 0 and pts[:, 1].min() >= 0
        assert pts[:, 0].max() <= dims[0] and pts[:, 1].max() <= dims[1]  # clamped to the slide
        for poly in polys:
            for ring in poly:
                assert ring[0] == ring[-1] and len(ring) >= 5
        # every region centre (inside the slide) is covered by exactly its own prototype's polygons
        for (x, y), lab in zip(coords, labels):
            cx, cy = min(x + size / 2, dims[0] - 1), y + size / 2
            assert sum(_covers(p, cx, cy) for p in polys) == int(lab == k)
        assert int(props["metadata"]["regions"]) == int((labels == k).sum())


def test_geojson_subset_and_errors(tmp_path):
    coords, labels = _lattice(seed=1)
    subset = prototype_geojson(coords, 300, labels, STYLES, only=[1])
    assert [f["properties"]["name"] for f in subset["features"]] == ["Stroma"]
    with pytest.raises(ExportError, match="nothing to export|no labeled"):
        write_geojson(tmp_path / "x.geojson", {"type": "FeatureCollection", "features": []})
    # A region half a region off the lattice is drawn exactly on a finer lattice (the later region wins
    # where two overlap).
    shifted = coords.copy()
    shifted[-1] += 150
    moved = prototype_geojson(shifted, 300, labels, STYLES)
    k = int(labels[-1])
    feature = next(f for f in moved["features"] if int(f["properties"]["metadata"]["prototype"]) == k)
    geom = feature["geometry"]
    polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
    x, y = shifted[-1]
    assert sum(_covers(p, x + 1, y + 1) for p in polys) == 1 and sum(_covers(p, x + 299, y + 299) for p in polys) == 1
    off = coords.copy()
    off[0] += 97  # neither on the lattice nor on a common finer one of a fractional region size
    with pytest.raises(ExportError, match="grid|lattice"):
        prototype_geojson(off, 300.5, labels, STYLES)
    with pytest.raises(ExportError, match="labels for"):
        prototype_geojson(coords, 300, labels[:-1], STYLES)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_label_map_tiff_palette_resolution_and_description(tmp_path):
    import tifffile

    coords, labels = _lattice(seed=2)
    path = write_label_map_tiff(tmp_path / "map.tif", coords, 300, labels, STYLES, mpp=0.5, slide_id="s1")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        image = page.asarray()
        assert page.photometric == tifffile.PHOTOMETRIC.MINISBLACK or page.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        cmap = page.colormap
        num, den = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert num / den == pytest.approx(1e4 / (0.5 * 300))  # one pixel = one 150-um region
        desc = json.loads(page.description)
    assert image.shape == (5, 7) and image.dtype == np.uint8
    cells = (coords - coords.min(0)) // 300
    np.testing.assert_array_equal(image[cells[:, 1], cells[:, 0]], labels + 1)
    assert (image > 0).sum() == len(coords)
    assert desc["origin_level0"] == [40.0, 10.0] and desc["pixel_size_level0"] == 300
    assert desc["values"]["1"] == "Tumor" and desc["colors"]["3"] == "#323232"
    assert tuple(cmap[:, 1] // 257) == (0xc8, 0x1e, 0x1e)
