"""Errors with messages meant for the person who gave the input."""


class SlpdError(Exception):
    """Base class: bad input or a state the user can fix. The message says what and how."""


class SlideError(SlpdError):
    """A slide cannot be opened or read (corrupt, truncated, missing)."""


class NotASlideError(SlideError):
    """The path exists but is not a whole-slide image any reader here understands."""


class PixelSizeError(SlpdError):
    """The pixel size is missing or implausible and no fallback was chosen."""


class CheckpointError(SlpdError):
    """A checkpoint does not exist, is unsafe to load, or does not fit the architecture."""


class FeatureStoreError(SlpdError):
    """A feature cache file is missing, incomplete, or was made with other settings."""


class PrototypeError(SlpdError):
    """Prototypes cannot be computed or compared (too few regions, mismatched dims, NaNs, empty cohort)."""


class ExportError(SlpdError):
    """Regions cannot be exported (not on a lattice, mismatched lengths, nothing to write)."""
