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


class StorageError(SlpdError):
    """A cache file cannot be written: the disk is full (kind "full") or the folder is read-only or someone
    else's (kind "read-only"). The message names the folder, the space needed and what was kept."""

    def __init__(self, message: str, folder=None, kind: str = "full", needed: int | None = None,
                 free: int | None = None):
        super().__init__(message)
        self.folder = folder
        self.kind = kind
        self.needed = needed
        self.free = free

    def __reduce__(self):  # picklable across worker processes with its fields
        return (type(self), (str(self), self.folder, self.kind, self.needed, self.free))


class CacheDamagedError(SlpdError):
    """A cache file is damaged (not readable, wrong format); the message names it and what happens next."""
