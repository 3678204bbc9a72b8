"""DICOM WSI series (one file per level, TILED_FULL frames) as TileReader levels.

pydicom reads each level's header (stopping before the pixel data); the encapsulated pixel data's items
are then walked once to record every frame's byte offset and length, and frames are read with os.pread.
JPEG baseline frames are decoded with the colour space the PhotometricInterpretation states
(YBR_FULL[_422]: YCbCr, RGB: RGB, as openslide does), JPEG 2000 frames with OpenJPEG. Sparse tiling,
concatenations, several fragments per frame and uncompressed frames leave the slide to openslide.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from napari_slpd.slides.readers.tiff import Unsupported
from napari_slpd.slides.readers.tiles import (
    TileLevel,
    TileReader,
    jpeg2000_decoder,
    jpeg_decoder,
    pread_source,
)

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
             "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
_ITEM = b"\xfe\xff\x00\xe0"
_END = b"\xfe\xff\xdd\xe0"


def _frame_table(path: Path, start: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of the ``n_frames`` frames of the encapsulated pixel data whose tag is at ``start``."""
    with open(path, "rb") as fh:
        fh.seek(start)
        head = fh.read(12)
        if head[:4] != b"\xe0\x7f\x10\x00" or head[8:12] != b"\xff\xff\xff\xff":
            raise Unsupported("pixel data is not encapsulated (uncompressed frames)")
        pos = start + 12
        offsets, lengths = [], []
        first = True
        while True:
            fh.seek(pos)
            item = fh.read(8)
            if len(item) < 8 or item[:4] == _END:
                break
            if item[:4] != _ITEM:
                raise Unsupported("unexpected element inside the encapsulated pixel data")
            (length,) = struct.unpack("<I", item[4:])
            if not first:
                offsets.append(pos + 8)
                lengths.append(length)
            first = False  # the first item is the Basic Offset Table
            pos += 8 + length
    if len(offsets) != n_frames:
        raise Unsupported(f"{len(offsets)} fragments for {n_frames} frames (several fragments per frame)")
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def open_dicom_reader(path, level_dimensions, level_downsamples) -> TileReader:
    import pydicom

    path = Path(path)
    folder = path.parent if path.is_file() else path
    volumes = {}
    for candidate in sorted(folder.glob("*.dcm")):
        with open(candidate, "rb") as fh:
            try:
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
            except Exception:
                continue
            pixel_start = fh.tell()
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if "VOLUME" not in image_type or "TotalPixelMatrixColumns" not in ds:
            continue
        size = (int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))
        if size in volumes:
            raise Unsupported(f"several files hold the {size[0]}x{size[1]} level (a concatenation)")
        volumes[size] = (candidate, ds, pixel_start)

    levels, closers, codecs = [], [], set()
    try:
        for (w, h), downsample in zip(level_dimensions, level_downsamples):
            found = volumes.get((int(w), int(h)))
            if found is None:
                raise Unsupported(f"no DICOM VOLUME instance of {w}x{h} px")
            file, ds, pixel_start = found
            if str(ds.get("DimensionOrganizationType", "TILED_FULL")).upper() != "TILED_FULL":
                raise Unsupported("sparse tiling (TILED_SPARSE)")
            if int(ds.SamplesPerPixel) != 3 or int(ds.BitsAllocated) != 8:
                raise Unsupported(f"{ds.SamplesPerPixel} samples of {ds.BitsAllocated} bits")
            syntax = str(ds.file_meta.TransferSyntaxUID)
            tw, th = int(ds.Columns), int(ds.Rows)
            n_frames = int(ds.get("NumberOfFrames", 1))
            expected = -(-int(w) // tw) * -(-int(h) // th)
            if n_frames != expected:
                raise Unsupported(f"{n_frames} frames for a {expected}-tile level")
            photometric = str(ds.PhotometricInterpretation).upper()
            if syntax == JPEG_BASELINE:
                colorspace = "RGB" if photometric == "RGB" else "YCBCR"
                decode, codec, scalable = jpeg_decoder(None, colorspace, tw, th), "jpeg", True
            elif syntax in JPEG_2000:
                decode, codec, scalable = jpeg2000_decoder(ycbcr=False), "jpeg2000", False
            else:
                raise Unsupported(f"transfer syntax {syntax}")
            offsets, lengths = _frame_table(file, pixel_start, n_frames)
            tile_bytes, close = pread_source(str(file), offsets, lengths)
            closers.append(close)
            codecs.add(codec)
            levels.append(TileLevel(width=int(w), height=int(h), tile_w=tw, tile_h=th, downsample=float(downsample),
                                    codec=codec, tile_bytes=tile_bytes, decode=decode, offsets=offsets,
                                    scalable=scalable))
    except Exception:
        for close in closers:
            close()
        raise

    def close_all():
        for close in closers:
            close()

    return TileReader(path=str(folder), name=f"tiles:dicom-{'+'.join(sorted(codecs))}", levels=levels,
                      closer=close_all)
