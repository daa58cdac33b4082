"""Grounding heads: forward + backward time and memory per head, vs the ``sam`` head, on the same queries.

    python scripts/bench/heads.py [--presets tiny small] [--heads sam c3vg igvg] [--queries 8] [--steps 20]

For each preset and head, a fresh subprocess builds the head from the preset (``heads.enabled`` = that
head), feeds it random SAM image embeddings of B = queries / 2 images, n = ``--queries`` ``[SEG]``
queries with 12-token expressions, computes its registered criterion on generated targets (1–3
instances, a quarter no-target) and back-propagates. Printed per row: median step time (ms), peak RSS
of the process (MiB), the RSS added by the timed steps, and the bytes autograd saved for backward in one
step (activation memory; what a GPU would also hold). ``--attention`` also runs IGVG with
``heads.igvg.attention=plain`` beside the deformable decoder of the same width.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _targets(n: int, s: int, seed: int):
    from fclm.losses.heads import HeadTargets

    g = torch.Generator().manual_seed(seed)
    masks, boxes, union = [], [], []
    for i in range(n):
        k = 0 if i % 4 == 3 else int(torch.randint(1, 4, (1,), generator=g))
        m = torch.zeros(k, s, s)
        b = torch.zeros(k, 4)
        for j in range(k):
            x0, y0 = (torch.rand(2, generator=g) * 0.6).tolist()
            w, h = (0.1 + torch.rand(2, generator=g) * 0.3).tolist()
            m[j, int(y0 * s):int((y0 + h) * s), int(x0 * s):int((x0 + w) * s)] = 1
            b[j] = torch.tensor([x0, y0, x0 + w, y0 + h])
        masks.append(m)
        boxes.append(b)
        union.append(m.amax(0) if k else torch.zeros(s, s))
    return HeadTargets(masks=torch.stack(union), exists=torch.tensor([m.shape[0] > 0 for m in masks]),
                       instance_masks=masks, instance_boxes=boxes, valid_hw=torch.full((n, 2), s))


def run_one(preset: str, head: str, queries: int, steps: int, overrides: dict) -> dict:
    from fclm.config import model_config_from_dict
    from fclm.model.heads import HeadInputs, build_head, build_head_criterion
    from fclm.model.sam import build_sam

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    cfg = model_config_from_dict({"preset": preset, "heads": {"enabled": [head], "default": head, **overrides}})
    sam = build_sam(cfg.sam)
    llm_dim = 128 if preset == "tiny" else 512
    module = build_head(head, cfg=cfg, sam=sam, llm_dim=llm_dim)
    crit = build_head_criterion(head, cfg=cfg)
    b, n, t = max(1, queries // 2), queries, 12
    e, c, s = cfg.sam.embedding_size, cfg.sam.prompt_embed_dim, cfg.sam.img_size
    targets = _targets(n, s, seed=1)
    params = [p for p in list(module.parameters()) + list(sam.prompt_encoder.parameters()) + list(sam.mask_decoder.parameters())]

    def step() -> int:
        seg_hidden = torch.randn(n, llm_dim, requires_grad=True)
        inputs = HeadInputs(
            image_embeddings=torch.randn(b, c, e, e), seg_embeddings=torch.randn(n, c, requires_grad=True), seg_hidden=seg_hidden,
            seg_batch_index=torch.arange(n) % b, valid_hw=torch.full((b, 2), s),
            text_states=torch.randn(n, t, llm_dim, requires_grad=True), text_padding_mask=torch.arange(t)[None].expand(n, t) >= 9,
        )
        saved = [0]

        def pack(x: torch.Tensor) -> torch.Tensor:
            saved[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            preds = module(inputs)
            losses = crit({"query_index": torch.arange(n), **preds}, targets)
            total = sum(v * crit.loss_weights[k] for k, v in losses.items() if k in crit.loss_weights)
        total.backward()
        for p in params:
            p.grad = None
        return saved[0]

    for _ in range(3):
        step()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, saved = [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        saved = step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    owned = params if head == "sam" else list(module.parameters())  # the sam head runs SAM's own decoder
    n_params = sum(p.numel() for p in owned)
    return {"preset": preset, "head": head, "variant": ",".join(f"{k}={v}" for k, v in overrides.get(head, {}).items()) or "-",
            "ms": 1000 * statistics.median(times), "peak_rss_mib": rss / 1024, "step_rss_mib": (rss - rss0) / 1024,
            "saved_mib": saved / 2**20, "params": n_params, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--heads", nargs="+", default=["sam", "c3vg", "igvg"])
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--attention", action="store_true", help="also IGVG with plain attention in its decoder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_one(spec["preset"], spec["head"], args.queries, args.steps, spec["overrides"])))
        return
    jobs = [(p, h, {}) for p in args.presets for h in args.heads]
    if args.attention:
        jobs += [(p, "igvg", {"igvg": {"attention": "plain"}}) for p in args.presets]
    print(f"| preset | head | variant | fwd+bwd ms | peak RSS MiB | RSS added by steps MiB | saved for backward MiB | head params | threads |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for preset, head, overrides in jobs:
        child = json.dumps({"preset": preset, "head": head, "overrides": overrides})
        cmd = [sys.executable, __file__, "--child", child, "--queries", str(args.queries), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"| {r['preset']} | {r['head']} | {r['variant']} | {r['ms']:.1f} | {r['peak_rss_mib']:.0f} | {r['step_rss_mib']:.0f} | "
              f"{r['saved_mib']:.1f} | {r['params']:,} | {r['threads']} |", flush=True)


if __name__ == "__main__":
    main()
