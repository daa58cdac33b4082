"""The C3VG and IGVG heads routed from the LLM's ``[SEG]`` inside FCLM, on the demo's ShapesRef.

    python scripts/experiments/routed_heads.py [--out runs/demo] [--heads c3vg igvg] [--steps 1000]

Needs the data and tokenizer of ``bash scripts/demo.sh`` under ``OUT`` (and, for the comparison column,
``OUT/heads_summary.json`` of its specialist heads). For each head, one ``fclm-train`` run of
``train/configs/demo_stage1.yaml`` — the main demo's model (tiny FCLM: random Qwen2.5-VL under LoRA, the
plain seg projector) and recipe — with the head built in and chosen by default
(``model.heads.enabled=[HEAD]``), the head's settings and the data mixture read from its specialist demo
config (``demo_c3vg.yaml`` / ``demo_igvg.yaml``), no reconstruction warm-up (the mixtures have no region
records), ``--steps`` steps from scratch. Then, as ``scripts/demo_heads.py`` does, ``fclm-eval run --teacher-forced`` on the
held-out records (the head grounds the record's own ``[SEG]``) and the same metrics, printed beside the
specialist trained on the same data and the words-blind baselines. Writes (updates) ``OUT/routed_heads.json``,
one entry per head, steps and seed (``<head>_<steps>steps_seed<seed>``; the run folder is ``OUT/routed_<that>``), so
that several runs can go on as separate processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from demo import read_jsonl  # noqa: E402
from demo_heads import (  # noqa: E402
    EVAL_LIMITS, baseline, box_mask_consistency, objects_by_image, rescore, teacher_forced, train)
from fclm.io import write_json  # noqa: E402

HEADS = ("c3vg", "igvg")


def specialist_overrides(head: str) -> list[str]:
    """The data mixture and the head's own settings of its specialist demo config
    (``train/configs/demo_<head>.yaml``), as ``fclm-train`` overrides."""
    spec = yaml.safe_load((ROOT / "train" / "configs" / f"demo_{head}.yaml").read_text())
    train_files = yaml.safe_dump(spec["data"]["train"], default_flow_style=True).strip()
    settings = spec["model"]["heads"].get(head, {})
    return [f"data.train={train_files}",
            *(f"model.heads.{head}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
              for k, v in settings.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="held-out records per task (default: the heads demo's 300)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out, data = args.out, args.out / "shapesref"
    if not (data / "train_res.jsonl").exists() or not (out / "tokenizer").exists():
        raise SystemExit(f"{out} has no ShapesRef or tokenizer: run bash scripts/demo.sh first (or pass --out)")
    limit = args.limit or EVAL_LIMITS["res"]
    val = {"res": read_jsonl(data / "val_res.jsonl", limit), "gres": read_jsonl(data / "val_gres.jsonl", limit)}
    objects = objects_by_image(data, "val")
    specialist = json.loads((out / "heads_summary.json").read_text()) if (out / "heads_summary.json").exists() else {}
    evals = out / "routed_eval"
    results: dict[str, dict] = {}
    for head in args.heads:
        name = f"{head}_{args.steps}steps_seed{args.seed}"
        run_dir = out / f"routed_{name}"
        overrides = [f"output_dir={run_dir}", f"data.root={data}", f"sam_cache.dir={out / 'sam_cache'}",
                     f"model.backbone.tokenizer={out / 'tokenizer'}",
                     f"model.heads.enabled=[{head}]", f"model.heads.default={head}", "recon_warmup.steps=0",
                     f"max_steps={args.steps}", f"checkpoint.every={args.steps}", f"seed={args.seed}", "logging.progress_bar=false",
                     f"cpu_threads={args.threads}", *specialist_overrides(head)]
        t0 = time.perf_counter()
        train("demo_stage1.yaml", overrides)
        train_s = time.perf_counter() - t0
        if head == "c3vg":
            res, preds = teacher_forced(run_dir / "export", "res", val["res"], data, evals / f"{name}_res")
            rec = rescore("rec", val["res"], preds, data, evals / f"{name}_rec")
            random_preds = baseline(val["res"], objects, "random")
            results[head] = {
                "det_acc": rec["acc_05"], "mask_giou": res["giou"], "box_mask_consistency": box_mask_consistency(preds),
                "det_acc_random_object": rescore("rec", val["res"], random_preds, data, evals / "random_rec")["acc_05"],
                "mask_giou_random_object": rescore("res", val["res"], random_preds, data, evals / "random_res")["giou"],
                "train_s": train_s, "command": res["command"]}
        else:
            gres, preds = teacher_forced(run_dir / "export", "gres", val["gres"], data, evals / f"{name}_gres")
            grec = rescore("grec", val["gres"], preds, data, evals / f"{name}_grec")
            every = baseline(val["gres"], objects, "every")
            results[head] = {
                "f1score": grec["f1score"], "nacc": gres.get("n_acc"), "gres_giou": gres["giou"],
                "f1score_every_object": rescore("grec", val["gres"], every, data, evals / "every_grec")["f1score"],
                "gres_giou_every_object": rescore("gres", val["gres"], every, data, evals / "every_gres")["giou"],
                "train_s": train_s, "command": gres["command"]}
    summary_path = out / "routed_heads.json"  # one entry per head, kept across runs of one head each
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    write_json(summary_path, {**previous, **{f"{h}_{args.steps}steps_seed{args.seed}": {**r, "steps": args.steps, "seed": args.seed,
                                                                                      "n_eval": limit} for h, r in results.items()}})

    print(f"\nheads routed from [SEG] inside FCLM ({args.steps} steps each, seed {args.seed}; held-out ShapesRef, {limit} records per task)")
    print(f"| figure | routed | specialist ({out / 'heads_summary.json'}) | words-blind baseline |")
    print("|---|---:|---:|---:|")
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    if "c3vg" in results:
        r = results["c3vg"]
        print(f"| c3vg det. acc | {fmt(r['det_acc'])} | {fmt(specialist.get('c3vg_det_acc'))} | random object {fmt(r['det_acc_random_object'])} |")
        print(f"| c3vg mask gIoU | {fmt(r['mask_giou'])} | {fmt(specialist.get('c3vg_mask_giou'))} | random object {fmt(r['mask_giou_random_object'])} |")
        print(f"| c3vg box–mask consistency | {fmt(r['box_mask_consistency'])} | {fmt(specialist.get('c3vg_box_mask_consistency'))} | |")
    if "igvg" in results:
        r = results["igvg"]
        print(f"| igvg F1score | {fmt(r['f1score'])} | {fmt(specialist.get('igvg_f1score'))} | every object {fmt(r['f1score_every_object'])} |")
        print(f"| igvg N-acc | {fmt(r['nacc'])} | {fmt(specialist.get('igvg_nacc'))} | |")
        print(f"| igvg GRES gIoU | {fmt(r['gres_giou'])} | {fmt(specialist.get('igvg_gres_giou'))} | every object {fmt(r['gres_giou_every_object'])} |")
    print("train seconds: " + ", ".join(f"{h} {r['train_s']:.0f}" for h, r in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
