"""Benchmark: one stage-2 LoRA step of the real ``fclm-3b`` (random bf16 weights) on CPU.

    python scripts/bench/scale_step.py --out runs/bench/scale_3b.json

Builds ``fclm-3b`` from configuration alone (``fclm.training.scale.random_model_config``: Qwen2.5-VL-3B
architecture, SAM ViT-H at 1024 px, the real vocabulary), applies stage 2's trainability (LoRA on the
LLM + new token rows), and runs one forward + backward on one DL-RES sample (a ``<region>`` in the
prompt, a ``[SEG]`` in the answer; the Qwen image ``--image-pixels``, SAM's 1024 px frame), first without
and then with gradient checkpointing (``fclm.training.scale.run_cpu_scale_step``). bf16 matrix products
run in float32 (``fclm.training.bf16_cpu``: this CPU has no bf16 instructions). Reports the build time,
the step's time per part next to the FLOP shares computed from the configs
(``fclm.training.plan.step_flops``), peak memory next to the plan's prediction for the same setting
(``fclm.training.plan.step_memory``): the resident peak, and — each step run again under the profiler
(``--no-trace`` skips it) — the allocator peak of live tensor bytes, the CPU-only float32 copies live then,
and the tensors live at the peak. Results: ``docs/benchmarks.md``, "Real scale"; ``docs/scale.md``, "The plan
next to a measured step".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fclm-3b")
    parser.add_argument("--image-pixels", type=int, default=224 * 224, help="Qwen image area (min = max pixels)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--no-trace", action="store_true", help="skip the profiled run of each step (allocator peak)")
    args = parser.parse_args(argv)

    from fclm.training.scale import run_cpu_scale_step as run

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    result = run(args.preset, image_pixels=args.image_pixels, gradient_checkpointing=(False, True),
                 trace_allocations=not args.no_trace)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
