"""napari dock widgets: thin Qt layers over the Qt-free core (the only package here that imports Qt)."""

from napari_slpd.widgets.cohort import CohortWidget
from napari_slpd.widgets.embedding import EmbeddingMapWidget
from napari_slpd.widgets.evaluation import EvaluationWidget
from napari_slpd.widgets.features import FeaturesWidget
from napari_slpd.widgets.finetune import FineTuneWidget
from napari_slpd.widgets.labeling import LabelingWidget
from napari_slpd.widgets.prototypes import PrototypesWidget
from napari_slpd.widgets.similar import SimilarSlidesWidget

__all__ = [
    "CohortWidget",
    "EmbeddingMapWidget",
    "EvaluationWidget",
    "FeaturesWidget",
    "FineTuneWidget",
    "LabelingWidget",
    "PrototypesWidget",
    "SimilarSlidesWidget",
]
