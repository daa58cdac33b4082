"""``fclm-infer`` — answer every record of a schema JSONL with a trained FCLM, in ``fclm-eval``'s format.

    fclm-infer --model runs/stage2/export --data refcoco_val.jsonl --out preds.jsonl --batch-size 8
    torchrun --nproc_per_node 4 -m infer --model … --data … --out preds.jsonl      (sharded, merged at the end)
    accelerate launch -m infer --model … --data … --out preds.jsonl

Resumable: a rerun with the same ``--out`` skips the ids already written (kill it and start it again).
Bad records (malformed lines, unreadable images, bad regions) are reported and skipped with a count;
``--strict`` stops at the first one. Bad arguments end with one ``fclm-infer: error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "fclm-infer"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with ``fclm-eval run``: the model, where it runs, and how it decodes."""
    p.add_argument("--model", required=True, type=Path, help="exported model directory (fclm-train export)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left padding; default 8)")
    p.add_argument("--head", help="grounding head for every record (default: each record's 'head', else the model's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens (default 64)")
    p.add_argument("--image-root", type=Path, help="folder of the records' image paths (default: the data file's folder)")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="run the model in this precision")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--teacher-forced", action="store_true",
                   help="ground each record's own answer (its [SEG] tokens) in one forward instead of generating: "
                        "the grounding heads measured apart from generation (the only mode of a head specialist)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--data", required=True, type=Path, help="schema JSONL to answer (each record's last assistant turn is dropped)")
    p.add_argument("--out", required=True, type=Path, help="prediction JSONL (appended to; a rerun resumes)")
    p.add_argument("--limit", type=int, help="answer only the first N records")
    return p


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun, accelerate, deepspeed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def run_inference(args: argparse.Namespace, data: Path, out: Path) -> int:
    """Load the model, answer ``data`` into ``out`` (this rank's share), merge the shards; return the exit code."""
    import torch
    from transformers.utils import logging as hf_logging

    from fclm.inference import FCLMPredictor, SamplingConfig
    from fclm.inference.batch import infer_file, merge_shards
    from fclm.io import ErrorReport
    from fclm.model.loading import model_kind

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not data.is_file():
        raise ValueError(f"--data {data}: no such file")
    hf_logging.disable_progress_bar()  # transformers' per-load "Loading weights" bar: noise around our own
    rank, world, local_rank = distributed()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cpu"):
        torch.set_flush_denormal(True)
    if args.teacher_forced:
        from fclm.model.loading import load_pretrained

        model = load_pretrained(args.model).to(device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    else:
        if model_kind(args.model) == "head_specialist":
            raise ValueError(f"--model {args.model} is a head specialist: it grounds given answers but generates no "
                             "text; add --teacher-forced")
        model = FCLMPredictor.from_pretrained(args.model, device=device, dtype=args.dtype).model
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    stats = infer_file(
        model, data, out, teacher_forced=args.teacher_forced, image_root=args.image_root, batch_size=args.batch_size, head=args.head,
        sampling=sampling, rank=rank, world_size=world, limit=getattr(args, "limit", None), progress=not args.no_progress,
        report=ErrorReport(strict=args.strict),
    )
    print(f"[{PROG}] rank {rank}: {stats.n_written} written, {stats.n_skipped_done} already in the output, "
          f"{stats.report.count} skipped", file=sys.stderr)
    if stats.report.count:
        print(f"[{PROG}] {stats.report.summary()}", file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
        if rank == 0:
            n = merge_shards(data, out, world)
            print(f"[{PROG}] merged {world} shards into {out} ({n} predictions)", file=sys.stderr)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``fclm-infer`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"[{PROG}] %(message)s")
    try:
        run_inference(args, args.data, args.out)
    except (ValueError, OSError) as e:  # RecordError is a ValueError: it names the record and the problem
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    n = sum(1 for line in args.out.open(encoding="utf-8") if line.strip()) if args.out.exists() else 0
    if distributed()[0] == 0:
        print(f"[{PROG}] {args.out}: {n} predictions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
