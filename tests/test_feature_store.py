"""FeatureStore: layout, atomic completion, resume from the last verified chunk, settings never mixing."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from napari_slpd.errors import FeatureStoreError
from napari_slpd.features.store import (
    FeatureStore,
    FeatureStoreWriter,
    RegionChunk,
    StoreLayout,
    existing_store_is_current,
    partial_path_for,
    settings_key,
)

M, D, G, E = 7, 12, 4, 6
SETTINGS = {"patch_encoder": "toy", "region_px": 64, "patch_px": 16, "target_mpp": 0.5, "mpp": 0.25}


def make_data(seed: int = 0, m: int = M) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.normal(size=(m, D, G, G)).astype(np.float32),
        "embeddings": rng.normal(size=(m, E)).astype(np.float32),
        "coords": (np.arange(m * 2, dtype=np.int64).reshape(m, 2) * 64),
        "coverage": rng.uniform(0.25, 1, size=m).astype(np.float32),
        "patch_features": rng.normal(size=(m * G * G, D)).astype(np.float32),
        "patch_coords": np.arange(m * G * G * 2, dtype=np.int64).reshape(-1, 2),
    }


def chunk_of(data: dict, start: int, end: int) -> RegionChunk:
    g2 = G * G
    return RegionChunk(
        tokens=data["tokens"][start:end],
        embeddings=data["embeddings"][start:end],
        coords=data["coords"][start:end],
        coverage=data["coverage"][start:end],
        patch_features=data["patch_features"][start * g2 : end * g2],
        patch_coords=data["patch_coords"][start * g2 : end * g2],
    )


def layout(dtype: str = "float32", patch: bool = True) -> StoreLayout:
    return StoreLayout(n_regions=M, token_dim=D, grid_size=G, embed_dim=E, token_dtype=dtype, patch_features=patch)


def write(path, data, chunks=(3, 3, 1), settings=SETTINGS, finish=True, run=None, dtype="float32"):
    writer = FeatureStoreWriter(path, layout(dtype), settings, run or {"precision": "float32"},
                                attrs={"slide_id": "s1", "region_size_level0": 128},
                                coords_attrs={"patch_size": 32, "patch_level": 0})
    start = writer.n_done
    for size in chunks:
        if start >= M:
            break
        end = min(M, start + size)
        writer.append(chunk_of(data, start, end))
        start = end
    if finish:
        writer.finish()
    else:
        writer.close()  # as a killed or cancelled run would leave it: partial file, no lock
    return writer


def test_write_and_reopen_roundtrip(tmp_path):
    data = make_data()
    final = tmp_path / "features" / "s1.h5"
    write(final, data)
    assert final.exists() and not partial_path_for(final).exists()
    with FeatureStore.open(final) as store:
        assert store.n_regions == M and store.token_dim == D and store.grid_size == G and store.embed_dim == E
        np.testing.assert_array_equal(store.tokens(), data["tokens"])
        np.testing.assert_array_equal(store.region_embeddings, data["embeddings"])
        np.testing.assert_array_equal(store.region_coords, data["coords"])
        np.testing.assert_array_equal(store.region_coverage, data["coverage"])
        np.testing.assert_array_equal(store.features[()], data["patch_features"])
        np.testing.assert_array_equal(store.coords, data["patch_coords"])
        assert store.coords_attrs["patch_size"] == 32 and store.coords_attrs["patch_level"] == 0
        assert store.attrs["complete"] and store.attrs["n_regions"] == M
        assert store.attrs["region_px"] == 64 and store.slide_id == "s1" and store.region_size_level0 == 128
        assert store.settings_key == settings_key(SETTINGS)
        # lazy per-region reads, any order, with repeats
        np.testing.assert_array_equal(store.tokens([5, 1, 5]), data["tokens"][[5, 1, 5]])
        np.testing.assert_array_equal(store.region_tokens[2], data["tokens"][2])


def test_float16_tokens_and_overflow(tmp_path):
    data = make_data()
    write(tmp_path / "a.h5", data, dtype="float16")
    with FeatureStore.open(tmp_path / "a.h5") as store:
        assert store.region_tokens.dtype == np.float16
        np.testing.assert_allclose(store.tokens(), data["tokens"], atol=2e-3)
    data["tokens"][0, 0, 0, 0] = 1e6  # beyond float16
    with pytest.raises(FeatureStoreError, match="float32"):
        write(tmp_path / "b.h5", data, dtype="float16")


def test_settings_key_ignores_order_and_sees_values():
    assert settings_key({"a": 1, "b": [1, 2]}) == settings_key({"b": [1, 2], "a": 1})
    assert settings_key({"a": 1}) != settings_key({"a": 2})


def test_resume_after_interruption_gives_identical_file(tmp_path):
    data = make_data()
    full = tmp_path / "full.h5"
    write(full, data)
    part = tmp_path / "part.h5"
    write(part, data, chunks=(3, 3), finish=False)  # "killed" before the last chunk
    with pytest.raises(FeatureStoreError, match="did not finish"):
        FeatureStore.open(part)
    with pytest.raises(FeatureStoreError, match="unfinished"):
        FeatureStore.open(partial_path_for(part))
    resumed = write(part, data, chunks=(3, 3, 1))
    assert resumed.resumed_from == 6
    with FeatureStore.open(full) as a, FeatureStore.open(part) as b:
        for name in ("region_tokens", "region_embeddings", "region_coords", "region_coverage", "features", "coords"):
            np.testing.assert_array_equal(a._h5[name][()], b._h5[name][()])
        assert a.attrs["settings_key"] == b.attrs["settings_key"]


def test_half_written_chunk_is_dropped(tmp_path):
    data = make_data()
    final = tmp_path / "s.h5"
    write(final, data, chunks=(3,), finish=False)
    # A kill between writing rows and recording them: rows beyond n_regions_done hold garbage.
    with h5py.File(partial_path_for(final), "r+") as fh:
        fh["region_tokens"].resize(5, axis=0)
        fh["region_tokens"][3:5] = 99.0
    writer = FeatureStoreWriter(final, layout(), SETTINGS, {"precision": "float32"})
    assert writer.n_done == 3
    writer.append(chunk_of(data, 3, M))
    writer.finish()
    with FeatureStore.open(final) as store:
        np.testing.assert_array_equal(store.tokens(), data["tokens"])


def test_corrupted_chunk_fails_checksum_and_is_recomputed(tmp_path, caplog):
    data = make_data()
    final = tmp_path / "s.h5"
    write(final, data, chunks=(2, 2, 2), finish=False)
    with h5py.File(partial_path_for(final), "r+") as fh:
        fh["region_embeddings"][3] += 1.0  # inside the second chunk
    with caplog.at_level(logging.WARNING):
        writer = FeatureStoreWriter(final, layout(), SETTINGS, {"precision": "float32"})
    writer.close()
    assert writer.n_done == 2
    assert "checksum" in caplog.text


def test_partial_with_other_settings_or_precision_starts_over(tmp_path, caplog):
    data = make_data()
    final = tmp_path / "s.h5"
    write(final, data, chunks=(3,), finish=False)
    with caplog.at_level(logging.WARNING):
        w = FeatureStoreWriter(final, layout(), {**SETTINGS, "patch_px": 32}, {"precision": "float32"})
    w.close()
    assert w.n_done == 0 and "starting this slide over" in caplog.text
    write(final, data, chunks=(3,), finish=False)  # fresh partial with the original settings
    w = FeatureStoreWriter(final, layout(), SETTINGS, {"precision": "bfloat16"})
    w.close()
    assert w.n_done == 0  # never mixes two precisions in one file


def test_unreadable_partial_starts_over(tmp_path, caplog):
    final = tmp_path / "s.h5"
    partial_path_for(final).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with caplog.at_level(logging.WARNING):
        w = FeatureStoreWriter(final, layout(), SETTINGS, {"precision": "float32"})
    w.close()
    assert w.n_done == 0 and "unreadable" in caplog.text


def test_existing_complete_file_rules(tmp_path):
    data = make_data()
    final = tmp_path / "s.h5"
    assert existing_store_is_current(final, SETTINGS) is False  # nothing there
    write(final, data)
    assert existing_store_is_current(final, SETTINGS) is True
    assert existing_store_is_current(final, SETTINGS, overwrite=True) is False
    with pytest.raises(FeatureStoreError, match=r"other settings.*patch_px: 16 -> 32"):
        existing_store_is_current(final, {**SETTINGS, "patch_px": 32})
    assert existing_store_is_current(final, {**SETTINGS, "patch_px": 32}, overwrite=True) is False


def test_open_errors_are_specific(tmp_path):
    with pytest.raises(FeatureStoreError, match="does not exist.*slpd extract"):
        FeatureStore.open(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(FeatureStoreError, match="damaged or not an HDF5"):
        FeatureStore.open(junk)
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as fh:
        fh["features"] = np.zeros((3, 4), np.float32)
        fh["coords"] = np.zeros((3, 2), np.int64)
        fh.attrs["complete"] = True
    with pytest.raises(FeatureStoreError, match="import-features"):
        FeatureStore.open(clam)
    data = make_data()
    final = tmp_path / "s.h5"
    write(final, data)
    with pytest.raises(FeatureStoreError, match="12-d tokens.*384-d"):
        FeatureStore.open(final, expect_token_dim=384)
    with pytest.raises(FeatureStoreError, match="6-d region embeddings"):
        FeatureStore.open(final, expect_embed_dim=192)
    with h5py.File(final, "r+") as fh:  # damage: one region's embedding missing
        fh["region_embeddings"].resize(M - 1, axis=0)
    with pytest.raises(FeatureStoreError, match="region counts disagree"):
        FeatureStore.open(final)
    with h5py.File(final, "r+") as fh:
        fh.attrs["complete"] = False
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore.open(final)


def test_chunk_shape_and_count_checked(tmp_path):
    data = make_data()
    writer = FeatureStoreWriter(tmp_path / "s.h5", layout(), SETTINGS)
    bad = chunk_of(data, 0, 2)
    bad.embeddings = bad.embeddings[:, :3]
    with pytest.raises(FeatureStoreError, match="embeddings has shape"):
        writer.append(bad)
    writer.append(chunk_of(data, 0, 2))
    with pytest.raises(FeatureStoreError, match="cannot finish"):
        writer.finish()
    with pytest.raises(FeatureStoreError, match="more regions"):
        writer.append(chunk_of(make_data(m=M + 3), 0, M + 3))


def test_one_writer_per_slide_at_a_time(tmp_path):
    data = make_data()
    final = tmp_path / "s.h5"
    first = FeatureStoreWriter(final, layout(), SETTINGS)
    with pytest.raises(FeatureStoreError, match="another process is writing"):
        FeatureStoreWriter(final, layout(), SETTINGS)
    first.append(chunk_of(data, 0, 3))
    first.close()  # e.g. cancelled: the partial file stays, the lock goes
    with FeatureStoreWriter(final, layout(), SETTINGS) as second:
        assert second.n_done == 3
        second.append(chunk_of(data, 3, M))
        second.finish()
    assert not list(tmp_path.glob(".*.lock"))
    FeatureStore.open(final).close()


def test_without_patch_features(tmp_path):
    data = make_data()
    lay = StoreLayout(n_regions=M, token_dim=D, grid_size=G, embed_dim=E, patch_features=False)
    chunk = chunk_of(data, 0, M)
    chunk.patch_features = chunk.patch_coords = None
    from napari_slpd.features.store import write_store

    write_store(tmp_path / "s.h5", lay, SETTINGS, chunk)
    with FeatureStore.open(tmp_path / "s.h5") as store:
        assert store.features is None and store.coords is None and store.coords_attrs == {}
        np.testing.assert_allclose(store.tokens(), data["tokens"], atol=2e-3)  # float16 by default
