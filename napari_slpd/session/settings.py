"""What a session works with: the settings of features, prototypes and the embedding map, saved in the cohort
and loaded into every panel."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from napari_slpd.errors import SlpdError
from napari_slpd.similarity.embedding_map import UmapParams
from napari_slpd.slides.pixel_size import MPP_FALLBACKS
from napari_slpd.utils.device import check_device_name

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

THUMBNAIL_PX = 256


# -- settings ------------------------------------------------------------------------------------------


@dataclass
class FeatureSettings:
    """What the Features panel edits: encoders, device and the region grid."""

    patch_encoder: str = "hipt_vit256"  # "hipt_vit256" | "timm:<name>" | "open_clip:<name>"
    patch_checkpoint: str | None = None  # None: random init (hipt_vit256 only)
    patch_input_px: int | None = None  # the encoder's input side; None = its model card's
    region_encoder: str = "hipt_vit4k"  # "hipt_vit4k" | "mean"
    region_checkpoint: str | None = None
    device: str = "auto"  # "auto" | "cuda" | "cpu"
    region_px: int = 4096
    patch_px: int = 256
    target_mpp: float = 0.5
    min_tissue: float = 0.25
    mpp_fallback: str = "none"  # for slides that state no plausible pixel size
    batch_size: int = 256
    num_workers: int = 2
    token_dtype: str = "float16"
    overwrite: bool = False  # replace feature files made with other settings (current ones stay cached)

    def __post_init__(self):
        check_device_name(self.device)
        if self.mpp_fallback not in MPP_FALLBACKS:
            raise SlpdError(f"mpp_fallback must be one of {MPP_FALLBACKS}, not {self.mpp_fallback!r}")
        self.grid_config()  # validates region/patch sizes with the grid's own messages

    def grid_config(self):
        from napari_slpd.slides.grid import GridConfig

        return GridConfig(
            region_px=int(self.region_px),
            patch_px=int(self.patch_px),
            target_mpp=float(self.target_mpp),
            min_tissue=float(self.min_tissue),
        )

    def encoder_key(self) -> tuple:
        return (self.patch_encoder, self.patch_checkpoint, self.patch_input_px, self.region_encoder,
                self.region_checkpoint, self.device)

    @property
    def random_init(self) -> bool:
        """Whether a HIPT encoder runs without weights (its features then carry no learned morphology)."""
        patch_random = self.patch_checkpoint is None and self.patch_encoder == "hipt_vit256"
        region_random = self.region_checkpoint is None and self.region_encoder == "hipt_vit4k"
        return patch_random or region_random


@dataclass
class PrototypeSettings:
    k: int = 4  # SPEC: K = 4 (NSCLC), 2 (BRCA); up to 32
    seed: int = 0
    niter: int = 10
    nredo: int = 5
    min_regions: int | None = None  # slides with fewer regions get no prototypes (None: K regions)

    def __post_init__(self):
        if not 1 <= int(self.k) <= 32:
            raise SlpdError(f"the number of prototypes K must be between 1 and 32, not {self.k}")


@dataclass
class SessionSettings:
    features: FeatureSettings = field(default_factory=FeatureSettings)
    prototypes: PrototypeSettings = field(default_factory=PrototypeSettings)
    top_k: int = 10  # neighbours listed for a query
    umap: UmapParams = field(default_factory=UmapParams)
    # The writable cache folder for when this cohort is read-only ("" : --cache / $SLPD_CACHE_DIR, the user
    # config, ~/.cache); see napari_slpd.utils.storage.default_cache_root.
    cache_folder: str = ""

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        # The session that owns these settings saves them into its cohort on every change (also when a
        # core function such as use_checkpoint switches the encoder by assigning ``features``).
        hook = self.__dict__.get("_on_change")
        if hook is not None and not name.startswith("_"):
            hook()

    def __getstate__(self):  # copies and pickles never carry the owning session's save hook
        return {k: v for k, v in self.__dict__.items() if k != "_on_change"}

    def to_dict(self) -> dict:
        """The settings as saved in the cohort (``cohort.json`` "settings"). ``overwrite`` is an action
        option of one run, never saved (a reopened cohort must not replace features unasked)."""
        from dataclasses import asdict

        features = asdict(self.features)
        features.pop("overwrite", None)
        return {"features": features, "prototypes": asdict(self.prototypes), "top_k": int(self.top_k),
                "umap": asdict(self.umap), "cache_folder": str(self.cache_folder or "")}

    @classmethod
    def from_dict(cls, data: dict) -> tuple["SessionSettings", list[str]]:
        """(settings, problems): values that are unknown or invalid are left at their defaults and named
        in ``problems`` (a cohort written by another version still opens)."""
        from dataclasses import fields

        problems: list[str] = []

        def build(kind, section_name):
            section = data.get(section_name)
            if not isinstance(section, dict):
                return kind()
            names = {f.name for f in fields(kind)}
            values = {k: v for k, v in section.items() if k in names and k != "overwrite"}
            unknown = sorted(set(section) - names)
            if unknown:
                problems.append(f"{section_name}: unknown setting(s) {', '.join(unknown)} ignored")
            try:
                return kind(**values)
            except (SlpdError, TypeError, ValueError) as exc:
                problems.append(f"{section_name}: {exc}; defaults used")
                return kind()

        settings = cls(features=build(FeatureSettings, "features"), prototypes=build(PrototypeSettings, "prototypes"),
                       umap=build(UmapParams, "umap"))
        try:
            settings.top_k = max(1, int(data.get("top_k", settings.top_k)))
        except (TypeError, ValueError):
            problems.append(f"top_k {data.get('top_k')!r} is not a number; {settings.top_k} used")
        cache_folder = data.get("cache_folder", "")
        if isinstance(cache_folder, str):
            settings.cache_folder = cache_folder
        else:
            problems.append(f"cache_folder {cache_folder!r} is not a folder name; ignored")
        return settings, problems
