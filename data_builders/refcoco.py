"""RefCOCO / RefCOCO+ / RefCOCOg (refer format) → ``res`` (or ``rec``) records, one per sentence.

``fclm-data refcoco --dataset refcocog --split-by umd --root DATA --out refcocog_umd.jsonl``

Each record: user ``Please segment: {sent}.``, assistant ``[SEG]``, one target holding the referred
object (mask from its polygons/RLE, box from its COCO ``bbox``); ``meta`` has ``split``,
``ref_id``, ``sent_id``, ``ann_ids``, ``category``.
"""

from __future__ import annotations

from data_builders.refer import Variant, command

VARIANT = Variant(
    name="refcoco",
    refs_files=("refs({split_by}).p",),
    objects=lambda ref, sent, where: [ref["ann_id"]],
)


build, add_arguments, run = command(VARIANT, dataset="refcoco", split_by="unc", task="res", tasks=("res", "rec"))
