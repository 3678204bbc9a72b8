"""A work-around for software OpenGL: load triton's LLVM before Mesa's.

Under software rendering (Mesa llvmpipe, as under Xvfb or on remote desktops without a GPU driver),
importing triton after napari has drawn its canvas crashes the process: two LLVMs clash. torch imports
triton through torch._dynamo, which timm and open_clip pull in (patch encoders, zero-shot names, "Use
checkpoint"). Importing triton first, before any viewer exists, avoids it. Hardware OpenGL is not affected.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def preload_triton() -> None:
    """Import triton when installed; without it (or without a usable build) there is nothing to clash."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build raising on import
        log.debug("triton not preloaded: %s", exc)
