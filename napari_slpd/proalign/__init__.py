"""ProAlign (SPEC section 4): prototypes named by pathology text, placed in a vision-language space.

- :mod:`.descriptions`: prototype types of an organ with several text descriptions each (YAML files).
- :mod:`.vlm`: the open_clip vision-language model (text and image towers) from a local checkpoint.
- :mod:`.core`: text prototypes t_k, visual prototypes p_k, slide embedding concat_k s_k (and the mean),
  zero-shot patch labels; parameter-free, streamed over patches.
- :mod:`.cache`: per-slide results in the cohort cache; :mod:`.pipeline`: a whole cohort.
- :mod:`.describe`: regenerate description files with an OpenAI-compatible chat endpoint.

Nothing here imports Qt or napari.
"""

from napari_slpd.proalign.cache import (
    ProAlignCacheError,
    ProAlignResult,
    load_cohort_embeddings,
    load_proalign,
    write_proalign,
)
from napari_slpd.proalign.core import (
    DEFAULT_TAU,
    Cancelled,
    ProAlignConfig,
    SlideAlignment,
    TextPrototypes,
    align_slide,
    attention_pool,
    attention_weights,
    region_labels,
    slide_embedding,
    text_prototypes,
    visual_prototypes,
    zero_shot_labels,
)
from napari_slpd.proalign.descriptions import (
    DescriptionError,
    PrototypeDescriptions,
    PrototypeType,
    available_descriptions,
    load_descriptions,
    parse_descriptions,
    validate_descriptions,
)
from napari_slpd.proalign.pipeline import SlideOutcome, align_store, run_proalign


def __getattr__(name):
    # The VLM pulls in open_clip: import it only when asked for.
    if name == "VisionLanguageModel":
        from napari_slpd.proalign.vlm import VisionLanguageModel

        return VisionLanguageModel
    raise AttributeError(f"module 'napari_slpd.proalign' has no attribute {name!r}")


__all__ = [
    "DEFAULT_TAU", "Cancelled", "DescriptionError", "ProAlignCacheError", "ProAlignConfig", "ProAlignResult",
    "PrototypeDescriptions", "PrototypeType", "SlideAlignment", "SlideOutcome", "TextPrototypes",
    "VisionLanguageModel", "align_slide", "align_store", "attention_pool", "attention_weights",
    "available_descriptions", "load_cohort_embeddings", "load_descriptions", "load_proalign",
    "parse_descriptions", "region_labels", "run_proalign", "slide_embedding", "text_prototypes",
    "validate_descriptions", "visual_prototypes", "write_proalign", "zero_shot_labels",
]
