"""The one orchestrator of a cohort, shared by the napari panels, the ``slpd`` CLI and the demo (Qt-free).

``Session`` (``session.py``) opens a cohort and runs its stages: extract, prototypes, the index, similar
slides and regions, evaluation; ``status.py`` and ``views.py`` are its per-slide statuses and what panels
show (mixins of ``Session``); ``settings.py`` what it works with, ``results.py`` what it answers with;
``versions.py`` and ``use_checkpoint.py`` switch the cohort's region encoder (a fine-tuned checkpoint, or back
to an earlier version) with the prototypes, names and index that go with it; ``demo_cohort.py`` builds the
demo's cohort through it.
"""

from napari_slpd.session.results import RegionData, RegionMatch, SlideMatch, SlideStatus
from napari_slpd.session.session import Session
from napari_slpd.session.settings import FeatureSettings, PrototypeSettings, SessionSettings

__all__ = ["FeatureSettings", "PrototypeSettings", "RegionData", "RegionMatch", "Session", "SessionSettings",
           "SlideMatch", "SlideStatus"]
