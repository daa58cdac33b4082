"""Load any model directory written by ``save_pretrained``: :class:`~fclm.model.fclm.FCLM` or a head specialist."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

__all__ = ["model_kind", "load_pretrained"]


def model_kind(directory: str | Path) -> str:
    """``fclm`` or ``head_specialist``: the ``kind`` in a model directory's ``fclm_config.json``."""
    from fclm.model.fclm import CONFIG_NAME

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an FCLM model directory: {CONFIG_NAME} is missing")
    try:
        payload = json.loads(path.read_text())
        kind = (payload.get("config") or {}).get("kind", "fclm")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a readable FCLM config: {e}") from None
    if kind not in ("fclm", "head_specialist"):
        raise ValueError(f"{path}: unknown model kind {kind!r}")
    return kind


def load_pretrained(directory: str | Path) -> nn.Module:
    """The model saved in ``directory``, whichever kind it is."""
    if model_kind(directory) == "head_specialist":
        from fclm.model.specialist import HeadSpecialist

        return HeadSpecialist.from_pretrained(directory)
    from fclm.model.fclm import FCLM

    return FCLM.from_pretrained(directory)
