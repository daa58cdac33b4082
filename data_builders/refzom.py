"""Ref-ZOM (toggle1995/RIS-DMMI) → ``gres`` records, one per sentence.

``fclm-data refzom --root DATA --out refzom_test.jsonl --split test`` reads
``DATA/ref-zom/refs(final).p`` and ``DATA/ref-zom/instances.json``. A ref's ``source`` says how many
objects its sentences name: ``zero`` (empty target), ``one`` (one instance) or ``many`` (two or
more instances, from the list ``ann_id``); kept as ``meta.zom``. A ref whose object count
contradicts its ``source`` is reported and skipped. Images are COCO train2014 + val2014
(``--image-root`` the merged ``trainval2014`` folder).
"""

from __future__ import annotations

from data_builders.refer import Variant, as_list, command
from fclm.io import RecordError


def _objects(ref: dict, sent: dict, where: str) -> list[int]:
    source = ref.get("source", "one")
    if source == "zero":
        return []
    ids = [a for a in as_list(ref["ann_id"]) if a != -1]
    if source == "one" and len(ids) != 1:
        raise RecordError(where, f"source 'one' but {len(ids)} annotation(s)")
    if source == "many" and len(ids) < 2:
        raise RecordError(where, f"source 'many' but {len(ids)} annotation(s)")
    if source not in ("one", "many"):
        raise RecordError(where, f"unknown source {source!r} (expected zero/one/many)")
    return ids


VARIANT = Variant(
    name="refzom",
    refs_files=("refs({split_by}).p",),
    objects=_objects,
    meta=lambda ref, sent: {"zom": ref.get("source", "one")},
)


build, add_arguments, run = command(VARIANT, dataset="ref-zom", split_by="final", task="gres", tasks=("gres", "grec"))
