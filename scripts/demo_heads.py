"""The specialist grounding heads on ShapesRef: C3VG on referring expressions, IGVG on generalized ones.

    python scripts/demo_heads.py [--out runs/demo] [--quick] [--c3vg-ablation]   (scripts/demo.sh runs it after demo.py)

1. reuses (or builds) ShapesRef and the tiny tokenizer of ``scripts/demo.py`` under ``OUT``;
2. trains each head alone as a specialist (``model.kind: head_specialist``: cached SAM image embeddings
   and a small text encoder in place of the LLM) through ``fclm-train`` with
   ``train/configs/demo_c3vg.yaml`` and ``train/configs/demo_igvg.yaml``;
3. grounds the held-out records' own ``[SEG]`` (``fclm-eval run --teacher-forced``: the heads measured
   apart from text generation) and scores them with the benchmark metrics (REC Acc@0.5, RES gIoU,
   GREC F1score, GRES gIoU and N-acc);
4. writes ``OUT/heads_summary.json`` and prints each figure beside its baseline: "random object" (a
   random object of the image, its box and mask), "every object" (all objects of the image, score 1),
   "nothing" (no instance).

``--c3vg-ablation`` also trains C3VG with ``heads.c3vg.consistency=false`` and reports the box–mask
consistency of both runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from demo import build_data, build_tokenizer, read_jsonl  # noqa: E402  (scripts/demo.py: same data and tokenizer)
from fclm.io import write_json, write_jsonl  # noqa: E402
from fclm.masks import decode_mask, mask_to_box  # noqa: E402

EVAL_LIMITS = {"res": 300, "gres": 300}
QUICK_LIMITS = {"res": 8, "gres": 8}


def train(config: str, overrides: list[str]) -> None:
    from train.__main__ import main as train_main

    rc = train_main([str(ROOT / "train" / "configs" / config), *overrides])
    if rc not in (0, None):
        raise SystemExit(f"training {config} failed (exit {rc})")


def teacher_forced(model_dir: Path, task: str, gt: list[dict], data: Path, out: Path) -> tuple[dict, list[dict]]:
    """``fclm-eval run --teacher-forced`` on ``gt`` (written beside the data); the summary and the predictions."""
    from eval.__main__ import main as eval_main

    gt_path = data / f"eval_heads_{out.name}_{len(gt)}.jsonl"
    write_jsonl(gt_path, gt)
    (out / "predictions.jsonl").unlink(missing_ok=True)
    argv = ["run", "--model", str(model_dir), "--task", task, "--gt", str(gt_path), "--out", str(out),
            "--teacher-forced", "--batch-size", "16", "--no-progress"]
    if eval_main(argv) != 0:
        raise SystemExit(f"fclm-eval {' '.join(argv)} failed")
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "command": "fclm-eval " + " ".join(argv)}, read_jsonl(out / "predictions.jsonl")


def rescore(task: str, gt: list[dict], preds: list[dict], data: Path, out: Path) -> dict:
    """Score ``preds`` against ``gt`` with ``task``'s metric (``fclm-eval score``)."""
    from fclm.metrics import score

    out.mkdir(parents=True, exist_ok=True)
    gt_path, pred_path = out / "gt.jsonl", out / "predictions.jsonl"
    write_jsonl(gt_path, [{**r, "image": str(data / r["image"])} for r in gt])
    write_jsonl(pred_path, preds)
    return score(task, gt_path, pred_path, out)


def box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_mask_consistency(preds: list[dict]) -> float:
    """Mean IoU between each predicted instance's box and its own mask's tight box (0 when the mask is empty)."""
    values = []
    for p in preds:
        for seg in p["segs"]:
            for inst in seg["instances"]:
                mask = decode_mask(inst["mask"])
                values.append(box_iou(inst["box"], mask_to_box(mask)) if mask.any() else 0.0)
    return float(np.mean(values)) if values else 0.0


def objects_by_image(data: Path, split: str) -> dict[str, list[dict]]:
    """image → its objects (``mask`` RLE and ``box``), from the split's region-caption records (one per object)."""
    out: dict[str, list[dict]] = {}
    for r in read_jsonl(data / f"{split}_region_caption.jsonl"):
        region = r["regions"][0]
        out.setdefault(r["image"], []).append({"mask": region["mask"], "box": region["box"]})
    return out


def baseline(records: list[dict], objects: dict[str, list[dict]], kind: str, seed: int = 0) -> list[dict]:
    """Predictions that ignore the words: ``random`` object, ``every`` object (score 1), or ``nothing``."""
    rng = np.random.default_rng(seed)
    preds = []
    for r in records:
        objs = objects.get(r["image"], [])
        if kind == "nothing" or not objs:
            chosen = []
        elif kind == "random":
            chosen = [objs[int(rng.integers(len(objs)))]]
        else:
            chosen = objs
        preds.append({"id": r["id"], "text": "[SEG]", "segs": [{"instances": [{**o, "score": 1.0} for o in chosen]}]})
    return preds


@torch.no_grad()
def cover_accuracy(model_dir: Path, records: list[dict], data: Path) -> float | None:
    """CoverAcc (IGVG Eq. 3) on held-out records: the criterion's ``metric_igvg_cover_acc``, averaged over batches."""
    from fclm.config import LossConfig
    from fclm.model.loading import load_pretrained
    from fclm.processor import load_image
    from fclm.training.loop import build_criterion

    model = load_pretrained(model_dir).eval()
    crit = build_criterion(LossConfig(), model.config)
    values, weights = [], []
    for i in range(0, len(records), 16):
        chunk = [r for r in records[i:i + 16] if r["targets"][0]["masks"]]
        if not chunk:
            continue
        batch = model.processor.collate([model.processor.encode_record(r, load_image(data / r["image"])) for r in chunk])
        losses = crit(model(batch), batch)
        if "metric_igvg_cover_acc" in losses:
            values.append(float(losses["metric_igvg_cover_acc"]))
            weights.append(len(chunk))
    return float(np.average(values, weights=weights)) if values else None


def run_c3vg(out: Path, data: Path, val: dict, objects: dict, common: list[str], steps: int | None, consistency: bool) -> dict:
    name = "c3vg" if consistency else "c3vg_no_consistency"
    overrides = [f"output_dir={out / name}", *common] + ([f"max_steps={steps}"] if steps else [])
    if not consistency:
        overrides.append("model.heads.c3vg.consistency=false")
    t0 = time.perf_counter()
    train("demo_c3vg.yaml", overrides)
    wall = time.perf_counter() - t0
    evals = out / "heads_eval"
    res, preds = teacher_forced(out / name / "export", "res", val["res"], data, evals / f"{name}_res")
    rec = rescore("rec", val["res"], preds, data, evals / f"{name}_rec")
    return {"det_acc": rec["acc_05"], "mask_giou": res["giou"], "box_mask_consistency": box_mask_consistency(preds),
            "train_s": wall, "command": res["command"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--c3vg-steps", type=int, default=None, help="override demo_c3vg.yaml max_steps")
    ap.add_argument("--igvg-steps", type=int, default=None, help="override demo_igvg.yaml max_steps")
    ap.add_argument("--c3vg-ablation", action="store_true", help="also train C3VG without its consistency losses")
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, a few steps (for tests)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: fast on a shared machine, as scripts/demo.py)")
    # scripts/demo.sh passes its arguments to scripts/demo.py and then here: ignore demo.py's own options
    args, _ = ap.parse_known_args(argv)

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    print(f"[demo_heads] {args.threads} torch thread(s)", flush=True)
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    limits = QUICK_LIMITS if args.quick else EVAL_LIMITS
    n_train, n_val = (40, 6) if args.quick else (args.n_train, args.n_val)
    c3vg_steps = args.c3vg_steps or (4 if args.quick else None)
    igvg_steps = args.igvg_steps or (4 if args.quick else None)

    data = build_data(out, n_train, n_val)
    tok_dir = build_tokenizer(data, out)
    val = {"res": read_jsonl(data / "val_res.jsonl", limits["res"]), "gres": read_jsonl(data / "val_gres.jsonl", limits["gres"])}
    objects = objects_by_image(data, "val")
    common = [f"data.root={data}", f"model.backbone.tokenizer={tok_dir}", f"sam_cache.dir={out / 'sam_cache'}",
              "logging.progress_bar=false", f"cpu_threads={args.threads}"]
    evals = out / "heads_eval"

    c3vg = run_c3vg(out, data, val, objects, common, c3vg_steps, consistency=True)
    c3vg_off = run_c3vg(out, data, val, objects, common, c3vg_steps, consistency=False) if args.c3vg_ablation else None
    random_preds = baseline(val["res"], objects, "random")
    random_rec = rescore("rec", val["res"], random_preds, data, evals / "baseline_random_rec")
    random_res = rescore("res", val["res"], random_preds, data, evals / "baseline_random_res")

    t0 = time.perf_counter()
    train("demo_igvg.yaml", [f"output_dir={out / 'igvg'}", *common] + ([f"max_steps={igvg_steps}"] if igvg_steps else []))
    igvg_train_s = time.perf_counter() - t0
    gres, preds = teacher_forced(out / "igvg" / "export", "gres", val["gres"], data, evals / "igvg_gres")
    grec = rescore("grec", val["gres"], preds, data, evals / "igvg_grec")
    base = {}
    for kind in ("every", "nothing"):
        b = baseline(val["gres"], objects, kind)
        base[kind] = {"grec": rescore("grec", val["gres"], b, data, evals / f"baseline_{kind}_grec"),
                      "gres": rescore("gres", val["gres"], b, data, evals / f"baseline_{kind}_gres")}
    cover = cover_accuracy(out / "igvg" / "export", val["gres"], data)

    summary = {
        "c3vg_det_acc": c3vg["det_acc"], "c3vg_det_acc_random_object": random_rec["acc_05"],
        "c3vg_mask_giou": c3vg["mask_giou"], "c3vg_mask_giou_random_object": random_res["giou"],
        "c3vg_box_mask_consistency": c3vg["box_mask_consistency"],
        "c3vg_box_mask_consistency_without_consistency_loss": None if c3vg_off is None else c3vg_off["box_mask_consistency"],
        "c3vg_det_acc_without_consistency_loss": None if c3vg_off is None else c3vg_off["det_acc"],
        "c3vg_mask_giou_without_consistency_loss": None if c3vg_off is None else c3vg_off["mask_giou"],
        "igvg_f1score": grec["f1score"], "igvg_f1score_every_object": base["every"]["grec"]["f1score"],
        "igvg_f1score_nothing": base["nothing"]["grec"]["f1score"],
        "igvg_nacc": gres.get("n_acc"), "igvg_nacc_every_object": base["every"]["gres"].get("n_acc"),
        "igvg_gres_giou": gres["giou"], "igvg_gres_giou_every_object": base["every"]["gres"]["giou"],
        "igvg_gres_giou_nothing": base["nothing"]["gres"]["giou"],
        "igvg_cover_acc": cover,
        "n_res": len(val["res"]), "n_gres": len(val["gres"]),
        "n_gres_no_target": sum(1 for r in val["gres"] if not r["targets"][0]["masks"]),
        "c3vg_train_s": c3vg["train_s"], "igvg_train_s": igvg_train_s,
        "c3vg_command": c3vg["command"], "igvg_command": gres["command"],
        "wall_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
    }
    write_json(out / "heads_summary.json", summary)
    rows = [
        ("c3vg_det_acc (REC Acc@0.5)", summary["c3vg_det_acc"], "random object", summary["c3vg_det_acc_random_object"]),
        ("c3vg_mask_giou", summary["c3vg_mask_giou"], "random object", summary["c3vg_mask_giou_random_object"]),
        ("c3vg_box_mask_consistency", summary["c3vg_box_mask_consistency"], "without the consistency loss",
         summary["c3vg_box_mask_consistency_without_consistency_loss"]),
        ("igvg_f1score (GREC)", summary["igvg_f1score"], "every object", summary["igvg_f1score_every_object"]),
        ("igvg_nacc (GRES N-acc)", summary["igvg_nacc"], "every object", summary["igvg_nacc_every_object"]),
        ("igvg_gres_giou", summary["igvg_gres_giou"], "every object / nothing",
         f"{summary['igvg_gres_giou_every_object']:.3f} / {summary['igvg_gres_giou_nothing']:.3f}"),
        ("igvg_cover_acc", summary["igvg_cover_acc"], "", None),
    ]
    print(f"\nheads on held-out ShapesRef ({summary['n_res']} res, {summary['n_gres']} gres of which "
          f"{summary['n_gres_no_target']} no-target), wall {summary['wall_s']:.0f} s")
    for name, value, base_name, base_value in rows:
        v = "n/a" if value is None else f"{value:.3f}"
        if base_value is None:
            b = "not run (--c3vg-ablation)" if "consistency" in base_name else ""
        else:
            b = base_value if isinstance(base_value, str) else f"{base_value:.3f}"
        print(f"  {name:32s} {v:>7s}   {base_name} {b}")
    print(f"summary: {out / 'heads_summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
