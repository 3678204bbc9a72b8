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
    from napari_slpd.features import store, versions
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
    from napari_slpd.features.versions import cohort_region_encoders, selected_region_encoder
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
