"""gRefCOCO (henghuiding/gRefCOCO, refer format with several or no objects) → ``gres`` (or ``grec``) records.

``fclm-data grefcoco --root DATA --out grefcoco.jsonl`` reads ``DATA/grefcoco/grefs(unc).json``
(or ``.p``) and ``DATA/grefcoco/instances.json``. A ref's ``ann_id`` is a list; ``[-1]`` means
no target and gives an empty target (``masks: []``). Crowd annotations are left out, as in ReLA.
"""

from __future__ import annotations

from data_builders.refer import Variant, as_list, command


def _objects(ref: dict, sent: dict, where: str) -> list[int]:
    ids = as_list(ref["ann_id"])
    return [] if ids == [-1] else ids


VARIANT = Variant(
    name="grefcoco",
    refs_files=("grefs({split_by}).json", "grefs({split_by}).p"),
    objects=_objects,
    meta=lambda ref, sent: {"no_target": as_list(ref["ann_id"]) == [-1]},
    skip_crowd=True,
)


build, add_arguments, run = command(VARIANT, dataset="grefcoco", split_by="unc", task="gres", tasks=("gres", "grec"))
