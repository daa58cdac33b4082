"""R-RefCOCO / R-RefCOCO+ / R-RefCOCOg (jianzongwu/robust-ref-seg) → ``gres`` records, one per sentence.

``fclm-data rrefcoco --dataset rrefcoco --root DATA --out rrefcoco_val.jsonl --split val``

The refer format with a per-sentence ``exist`` flag: a negative sentence (``exist`` false) describes
an object that is not in the image and gets an empty target; a sentence without the flag is
positive. The sentences of one referred object share ``meta.ref_id`` (R-RefCOCO's scoring unit);
``meta.exist`` keeps the flag.
"""

from __future__ import annotations

from data_builders.refer import Variant, command


def _exists(sent: dict) -> bool:
    return bool(sent.get("exist", True))


VARIANT = Variant(
    name="rrefcoco",
    refs_files=("refs({split_by}).p",),
    objects=lambda ref, sent, where: [ref["ann_id"]] if _exists(sent) else [],
    meta=lambda ref, sent: {"exist": _exists(sent)},
)


build, add_arguments, run = command(VARIANT, dataset="rrefcoco", split_by="unc", task="gres", tasks=("gres", "res"))
