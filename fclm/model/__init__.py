"""FCLM modeling: the top model, its builders and its parts (backbone, SAM backend, extractor, heads).

``FCLM`` and ``build_fclm`` are imported lazily so that importing one part (e.g. ``fclm.model.sam``)
does not import the whole model.
"""

from typing import Any

__all__ = ["FCLM", "build_fclm"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fclm.model import fclm as _fclm

        return getattr(_fclm, name)
    raise AttributeError(f"module 'fclm.model' has no attribute {name!r}")
