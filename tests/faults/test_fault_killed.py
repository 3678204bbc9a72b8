"""Fault 6: the process is killed (SIGKILL, no chance to clean up) while "Use checkpoint" switches the cohort
to new region embeddings, or while the cohort index is saved. Afterwards the cohort has the old state or
the new one, never a mix, and says which."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from faults.faults_support import embedding_cohort

pytestmark = pytest.mark.faults

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_killed(script: str, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                         timeout=240, cwd=REPO)
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-2000:])
    return out


_SWITCH = """
    import os, signal, sys
    from napari_slpd.features import store
    from napari_slpd.session import versions
    from napari_slpd.session import Session
    calls = []
    real = store.select_region_embedding_version
    def select_then_die(path, version):
        result = real(path, version)
        calls.append(path)
        if len(calls) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # killed between two feature files
        return result
    store.select_region_embedding_version = select_then_die
    versions.use_region_encoder(Session.open(sys.argv[1]), sys.argv[2], carry_names=False)
"""


@pytest.mark.parametrize("kill_after", [2, 6])
def test_killed_while_switching_region_embeddings(tmp_path, kill_after):
    from napari_slpd.features.store import FeatureStore, add_region_embedding_version
    from napari_slpd.session.versions import cohort_region_encoders, selected_region_encoder
    from napari_slpd.session import Session

    cohort = embedding_cohort(tmp_path / "cohort", n_slides=6, k=3)
    old = selected_region_encoder(cohort)
    rng = np.random.default_rng(0)
    for sid in cohort.slide_ids():  # a fine-tuned encoder's embeddings, added (not selected) as re-encoding does
        with FeatureStore.open(cohort.features_path(sid)) as store:
            n, e = store.region_embeddings.shape
        add_region_embedding_version(cohort.features_path(sid), rng.normal(size=(n, e)).astype(np.float32),
                                     "hipt_vit4k (file sha256:feedbeef)", sha256="feedbeef" * 8, select=False)
    new = next(e.key for e in cohort_region_encoders(cohort) if e.key != old)

    _run_killed(_SWITCH, str(cohort.root), new, str(kill_after))
    session = Session.open(cohort.root)
    state = selected_region_encoder(session.cohort)
    notes = " ".join(session.notices)
    if kill_after < 6:  # killed half-way: every file is back on the old embeddings
        assert state == old and "undone" in notes and old in notes, notes
    else:  # every file had switched: the cohort keeps the new embeddings
        assert state == new and "already selected" in notes, notes
    for sid in session.slide_ids():  # every feature file whole and readable
        with FeatureStore.open(session.cohort.features_path(sid)) as store:
            assert np.isfinite(store.region_embeddings).all()
    assert Session.open(cohort.root).notices == []  # settled once, said once


_INDEX = """
    import os, signal, sys
    import numpy as np
    from napari_slpd.cohort import Cohort
    from napari_slpd.similarity import persistence
    from napari_slpd.similarity.index import CohortIndex
    where = sys.argv[2]
    index = CohortIndex.load(Cohort(sys.argv[1]).index_dir)
    for i in range(3):
        index.add(f"extra{i}", np.eye(3, index.dim, dtype=np.float32))
    if where == "arrays":
        real_savez = np.savez
        def savez_then_die(fh, **arrays):
            real_savez(fh, **arrays)
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # the new data file half-way to its name
        persistence.np.savez = savez_then_die
    else:
        real = persistence.atomic_write_json
        def die_before_manifest(path, obj):
            os.kill(os.getpid(), signal.SIGKILL)  # data written, manifest not yet replaced
        persistence.atomic_write_json = die_before_manifest
    index.save(Cohort(sys.argv[1]).index_dir)
"""


@pytest.mark.parametrize("where", ["arrays", "manifest"])
def test_killed_while_saving_the_index(tmp_path, where):
    from napari_slpd.similarity.index import CohortIndex

    cohort = embedding_cohort(tmp_path / "cohort", n_slides=6, k=3)
    CohortIndex.open(cohort)
    before = CohortIndex.load(cohort.index_dir)
    _run_killed(_INDEX, str(cohort.root), where)
    after = CohortIndex.load(cohort.index_dir)  # the old index, whole
    assert after.slide_ids == before.slide_ids and len(after.query(before.slide_ids[0], n=3)) == 3
    # the next save leaves only the files of the index it saved
    after.add("extra", np.eye(3, after.dim, dtype=np.float32))
    after.save(cohort.index_dir)
    names = sorted(p.name for p in cohort.index_dir.iterdir())
    assert len([n for n in names if n.endswith(".npz")]) == 1 and not [n for n in names if "partial" in n], names


# -- a feature file killed while a new version of region embeddings is written into it ------------------

_ADD = """
    import os, signal, sys
    import numpy as np
    from napari_slpd.features import store_versions
    path, where = sys.argv[1], sys.argv[2]
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "dataset":  # inside HDF5's write: the dataset made, its attributes and the file not yet
        import h5py
        real = h5py.Group.create_dataset
        def create_then_die(self, *a, **kw):
            ds = real(self, *a, **kw)
            self.file.flush()
            die()
        h5py.Group.create_dataset = create_then_die
    else:
        store_versions._update_step = lambda name: die() if name == where else None
    n = int(sys.argv[3])
    store_versions.add_region_embedding_version(path, np.full((n, int(sys.argv[4])), 0.5, np.float32),
                                                "hipt_vit4k (file sha256:feedbeef)", sha256="feedbeef" * 8)
"""

_STEPS_OLD = ["recorded", "copied", "dataset", "written", "synced"]  # killed before the copy replaced the file
_STEPS_NEW = ["renamed", "done"]


def _state(path):
    from napari_slpd.features.store import FeatureStore, region_embedding_versions

    with FeatureStore.open(path) as store:
        emb = np.asarray(store.region_embeddings)
        encoder = store.attrs.get("region_encoder")
    return [(v.key, v.selected) for v in region_embedding_versions(path)], emb, encoder


@pytest.mark.parametrize("where", _STEPS_OLD + _STEPS_NEW)
def test_killed_while_adding_region_embeddings(tmp_path, where):
    from napari_slpd.features.store import add_region_embedding_version
    from napari_slpd.features.store_versions import update_paths
    from napari_slpd.session import Session

    cohort = embedding_cohort(tmp_path / "cohort", n_slides=2, k=3)
    sid = cohort.slide_ids()[0]
    path = cohort.features_path(sid)
    versions, emb, encoder = _state(path)
    _run_killed(_ADD, str(path), where, str(emb.shape[0]), str(emb.shape[1]))

    notes = " ".join(Session.open(cohort.root).notices)  # opening the cohort settles the file and says which
    after_versions, after_emb, after_encoder = _state(path)  # whole and readable
    assert not any(p.exists() for p in update_paths(path)), "the unfinished copy is removed"
    if where in _STEPS_OLD:
        assert after_versions == versions and np.array_equal(after_emb, emb) and after_encoder == encoder
        assert path.name in notes and "earlier state" in notes, notes
    else:
        assert [k for k, s in after_versions if s] == ["feedbeeffeed"] and np.all(after_emb == 0.5)
        assert after_encoder == "hipt_vit4k (file sha256:feedbeef)"
        if where == "renamed":
            assert path.name in notes and "new state" in notes, notes
        else:
            assert path.name not in notes, notes
    assert Session.open(cohort.root).notices == []  # settled once, said once
    # and the file takes the next update
    add_region_embedding_version(path, np.ones_like(emb), "other", select=True)
    assert np.all(_state(path)[1] == 1.0)


_ADD_LOOP = """
    import sys
    import numpy as np
    from napari_slpd.features.store_versions import add_region_embedding_version
    path, n, e = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    for i in range(100000):
        value = float(i % 7 + 1)
        add_region_embedding_version(path, np.full((n, e), value, np.float32), f"enc{i % 7}", select=True)
"""


def test_killed_at_any_moment_while_adding_region_embeddings(tmp_path):
    """SIGKILL from outside at moments spread over many updates: every time, the file is readable and holds
    one whole version (the selected version's data and the root attributes agree)."""
    import time

    from napari_slpd.features.store import FeatureStore, region_embedding_versions
    from napari_slpd.features.store_versions import update_paths
    from napari_slpd.session import Session

    cohort = embedding_cohort(tmp_path / "cohort", n_slides=1, k=3, regions=(400, 401))
    path = cohort.features_path(cohort.slide_ids()[0])
    with FeatureStore.open(path) as store:
        n, e = store.region_embeddings.shape
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.05, 0.6, size=4):
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_ADD_LOOP), str(path), str(n), str(e)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        Session.open(cohort.root)
        assert not any(p.exists() for p in update_paths(path))
        with FeatureStore.open(path) as store:
            emb = np.asarray(store.region_embeddings)
            encoder = str(store.attrs.get("region_encoder"))
        selected = [v for v in region_embedding_versions(path) if v.selected]
        assert len(selected) == 1 and selected[0].region_encoder == encoder
        if encoder.startswith("enc"):  # one of the loop's versions: all of its values, none of another's
            assert np.all(emb == float(int(encoder[3:]) + 1)), (encoder, np.unique(emb))
