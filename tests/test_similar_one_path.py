"""``slpd similar`` and the Similar slides panel's engine (the Session) give the same ranking.

The cohort holds a slide whose features were extracted with other settings (a larger region grid): its
prototypes are in the cohort index, but the panel leaves it out, and so must the command line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_slpd.cli import main
from napari_slpd.session import Session
from napari_slpd.session.settings import SessionSettings
from napari_slpd.similarity import CohortIndex
from test_prototypes import clustered_embeddings, make_cohort, write_feature_file

STALE = "alpha-other-grid"


def build_cohort(root, save_settings: bool):
    rng = np.random.default_rng(3)
    base = clustered_embeddings(rng, n_per=(10, 8, 6, 6), dim=16)[0]
    slides = {"alpha": base,
              "alpha-recut": base + 0.05 * rng.standard_normal(base.shape).astype(np.float32),
              "beta": clustered_embeddings(rng, n_per=(12, 9, 9), dim=16)[0],
              "gamma": clustered_embeddings(rng, n_per=(15, 15), dim=16)[0],
              "delta": np.concatenate([base[:12], clustered_embeddings(rng, n_per=(9, 9), dim=16)[0]]),
              STALE: base.copy()}
    cohort = make_cohort(root, slides)
    # The same tissue, extracted on another region grid: not comparable with the cohort's settings.
    write_feature_file(cohort.features_path(STALE), base, region_size=1024, settings_key="other-grid")
    if save_settings:
        settings = SessionSettings()
        settings.features.region_px, settings.features.patch_px = 512, 256
        settings.prototypes.k = 3
        Session(cohort.root, settings=SessionSettings()).settings = settings  # saved in the cohort, as the panel does
    assert main(["prototypes", str(cohort.root), "-k", "3", "--quiet"]) == 0
    return cohort


@pytest.fixture
def cohort(tmp_path, capsys):
    cohort = build_cohort(tmp_path / "cohort", save_settings=True)
    capsys.readouterr()
    return cohort


def cli_json(capsys, *argv) -> dict:
    assert main(["similar", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def ranking(matches) -> list[tuple]:
    return [(m.slide_id, round(m.distance, 6), round(m.similarity, 6), [list(p) for p in m.pairs])
            for m in matches]


def cli_ranking(results) -> list[tuple]:
    return [(r["slide_id"], r["distance"], r["similarity"], [[p["query"], p["match"]] for p in r["pairs"]])
            for r in results]


def test_whole_slide_query_ranks_the_same_in_the_cli_and_the_panel(cohort, capsys):
    # Without the Session's exclusion, the stale slide (a copy of alpha) would come first.
    assert CohortIndex.open(cohort).query("alpha", n=5)[0].slide_id == STALE
    panel = Session.open(cohort.root).similar_slides("alpha", top_k=5)
    assert STALE not in [m.slide_id for m in panel] and panel[0].slide_id == "alpha-recut"
    cli = cli_json(capsys, str(cohort.root), "alpha", "-n", "5")["results"]
    assert cli_ranking(cli) == ranking(panel)
    assert [r["rank"] for r in cli] == [m.rank for m in panel] == list(range(1, len(panel) + 1))
    exact = cli_json(capsys, str(cohort.root), "alpha", "-n", "5", "--exact")["results"]
    assert cli_ranking(exact) == ranking(panel)


def test_region_click_ranks_the_same_in_the_cli_and_the_panel(cohort, capsys):
    session = Session.open(cohort.root)
    protos = session.prototypes("alpha")
    for region in (0, 20):
        k = int(np.asarray(protos.assignments)[region])
        panel = session.similar_to_prototype("alpha", k, top_k=4)
        assert panel and STALE not in [m.slide_id for m in panel]
        assert [m.distance for m in panel] == sorted(m.distance for m in panel)
        out = cli_json(capsys, str(cohort.root), "alpha", "-n", "4", "--pattern-of-region", str(region))
        assert out["prototype"] == k and cli_ranking(out["results"]) == ranking(panel)
        by_k = cli_json(capsys, str(cohort.root), "alpha", "-n", "4", "--prototype", str(k))["results"]
        assert by_k == out["results"]


def test_a_cli_cohort_without_saved_settings_uses_the_query_slides_settings(tmp_path, capsys):
    cohort = build_cohort(tmp_path / "cli-cohort", save_settings=False)
    capsys.readouterr()
    assert cohort.load_settings() is None
    out = cli_json(capsys, str(cohort.root), "alpha", "-n", "5")
    assert [r["slide_id"] for r in out["results"]][0] == "alpha-recut"
    assert STALE not in [r["slide_id"] for r in out["results"]]
    assert main(["similar", str(cohort.root), "alpha", "--pattern-of-region", "999"]) == 2
    assert "there is no region 999" in capsys.readouterr().err
    assert cohort.load_settings() is None  # the command line wrote no settings into the cohort
