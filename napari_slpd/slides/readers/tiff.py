"""Tiled-TIFF slides (Aperio SVS, generic tiled TIFF, Philips TIFF) as TileReader levels.

Each openslide level is matched to the tiled TIFF page of the same size; tile offsets and byte counts
come from tifffile and the bytes are read with os.pread. JPEG tiles are decoded with the page's
JPEGTables and the colour space its photometric tag states (Aperio writes RGB-coded JPEG with
photometric RGB: decoding it as YCbCr, what libjpeg assumes for a bare 3-component stream, shifts every
colour by up to 136 levels). Aperio JPEG 2000 tiles: 33005 is RGB, 33003 YCbCr (converted as openslide
does). Other compressions tifffile decodes (LZW, deflate, zstd, webp, none...) go through tifffile's
own per-tile decoder. Anything else (stripped levels, planar data, 16-bit samples, a level without a
page of its size) leaves the slide to openslide.
"""

from __future__ import annotations

import numpy as np

from napari_slpd.slides.readers.tiles import (
    TileLevel,
    TileReader,
    jpeg2000_decoder,
    jpeg_decoder,
    pread_source,
)

VENDORS = ("aperio", "generic-tiff", "philips")


class Unsupported(Exception):
    """The file is readable by openslide but not by this reader; the message says why."""


def _page_ok(page) -> str | None:
    if not page.is_tiled:
        return "level is stored in strips, not tiles"
    if page.planarconfig != 1:
        return "planar (separate) colour planes"
    if page.samplesperpixel not in (3, 4) or page.bitspersample != 8:
        return f"{page.samplesperpixel} samples of {page.bitspersample} bits per pixel"
    if page.imagedepth != 1:
        return "volumetric tiles"
    return None


def _decoder_for(page):
    compression = int(page.compression)
    photometric = int(page.photometric)
    if compression in (7, 6):  # JPEG (6: old-style; tifffile still gives the stream)
        colorspace = {2: "RGB", 6: "YCBCR"}.get(photometric)
        if colorspace is None:
            raise Unsupported(f"JPEG tiles with photometric {photometric}")
        return "jpeg", jpeg_decoder(page.jpegtables, colorspace, page.tilewidth, page.tilelength), True
    if compression == 33005:
        return "jpeg2000", jpeg2000_decoder(ycbcr=False), False
    if compression == 33003:
        return "jpeg2000-ycbcr", jpeg2000_decoder(ycbcr=True), False
    if compression == 34712:
        return "jpeg2000", jpeg2000_decoder(ycbcr=photometric == 6), False
    if photometric != 2:
        raise Unsupported(f"compression {compression} with photometric {photometric}")

    def decode(data: bytes, scale: int = 1, _page=page) -> np.ndarray:
        # tifffile's per-tile decoder (imagecodecs underneath); index 0: every tile has the same shape.
        segment = _page.decode(data, 0, jpegtables=_page.jpegtables)[0]
        return np.asarray(segment).reshape(_page.tilelength, _page.tilewidth, -1)

    try:
        name = page.compression.name.lower()
    except AttributeError:
        name = f"compression-{compression}"
    return name, decode, False


def open_tiff_reader(path: str, vendor: str, level_dimensions, level_downsamples) -> TileReader:
    """A TileReader for ``path`` whose levels are openslide's, or raise Unsupported saying why not."""
    import tifffile

    if vendor not in VENDORS:
        raise Unsupported(f"openslide vendor {vendor!r} is read through openslide")
    tif = tifffile.TiffFile(path)
    try:
        pages = [p for p in tif.pages if p.is_tiled]
        by_size = {}
        for page in pages:
            by_size.setdefault((int(page.imagewidth), int(page.imagelength)), page)
        levels = []
        codecs = set()
        closers = []
        for (w, h), ds in zip(level_dimensions, level_downsamples):
            page = by_size.get((int(w), int(h)))
            if page is None:
                raise Unsupported(f"no tiled page of {w}x{h} px for an openslide level")
            problem = _page_ok(page)
            if problem:
                raise Unsupported(problem)
            codec, decode, scalable = _decoder_for(page)
            codecs.add(codec)
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
            tile_bytes, close = pread_source(path, offsets, counts)
            closers.append(close)
            levels.append(TileLevel(width=int(w), height=int(h), tile_w=int(page.tilewidth),
                                    tile_h=int(page.tilelength), downsample=float(ds), codec=codec,
                                    tile_bytes=tile_bytes, decode=decode, offsets=offsets, scalable=scalable))
            expected = levels[-1].tiles_across * levels[-1].tiles_down
            if offsets.size != expected:
                raise Unsupported(f"level of {w}x{h} px lists {offsets.size} tiles, not {expected}")
    except Unsupported:
        for close in locals().get("closers", []):
            close()
        raise
    finally:
        tif.close()

    def close_all():
        for close in closers:
            close()

    return TileReader(path=str(path), name=f"tiles:{vendor}-{'+'.join(sorted(codecs))}", levels=levels,
                      closer=close_all)
