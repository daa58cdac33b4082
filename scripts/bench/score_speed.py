"""Speed and memory of ``fclm.metrics.score`` against a straightforward per-sample Python loop.

5,000 GT records with one 480×640 RLE mask each, and 5,000 predictions, scored as RES (LISA gIoU /
cIoU) and GRES (ReLA gIoU / cIoU / N-acc / T-acc). The naive scorer reads the same JSONL files,
decodes every mask to a numpy array and counts pixels, one sample at a time — the way the official
scripts do it. Both must give the same numbers (checked), then the table is printed.

Each measurement runs in a fresh process; time excludes interpreter start and imports, peak memory
is the rise of the process's max RSS during the run (``resource.getrusage``).

    python scripts/bench/score_speed.py [--n 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

H, W = 480, 640


def _polygon(rng: np.random.Generator) -> list[float]:
    """A random star-shaped polygon (10 vertices) somewhere in the image."""
    cx, cy = rng.uniform(60, W - 60), rng.uniform(60, H - 60)
    r = rng.uniform(20, 140)
    ang = np.sort(rng.uniform(0, 2 * np.pi, 10))
    rad = r * rng.uniform(0.5, 1.0, 10)
    xs = np.clip(cx + rad * np.cos(ang), 0, W - 1)
    ys = np.clip(cy + rad * np.sin(ang), 0, H - 1)
    return np.stack([xs, ys], 1).reshape(-1).tolist()


def _rle(poly: list[float]) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.merge(mask_utils.frPyObjects([poly], H, W))
    return {"size": [H, W], "counts": r["counts"].decode("ascii")}


def make_data(folder: Path, n: int, task: str, seed: int = 0) -> tuple[Path, Path]:
    """GT and prediction JSONL with ``n`` records: the prediction is the GT polygon jittered.

    GRES also has 20% no-target GT records and 15% predictions with ``exists`` < 0.5."""
    rng = np.random.default_rng(seed)
    gt_path, pred_path = folder / f"{task}_gt.jsonl", folder / f"{task}_pred.jsonl"
    with open(gt_path, "w") as g, open(pred_path, "w") as p:
        for i in range(n):
            poly = _polygon(rng)
            empty_gt = task == "gres" and rng.random() < 0.2
            target = {"masks": [] if empty_gt else [_rle(poly)], "boxes": []}
            rec = {"id": f"s{i}", "image": f"img{i}.jpg", "task": task, "messages": [{"role": "assistant", "content": "[SEG]"}], "targets": [target], "meta": {}}
            g.write(json.dumps(rec) + "\n")
            jitter = (np.asarray(poly) + rng.normal(0, 8, len(poly))).clip(0, min(H, W) - 1).tolist()
            seg = {"instances": [{"mask": _rle(jitter), "score": 0.9}]}
            if task == "gres":
                seg["exists"] = 0.3 if rng.random() < 0.15 else 0.9
            p.write(json.dumps({"id": f"s{i}", "text": "[SEG]", "segs": [seg]}) + "\n")
    return gt_path, pred_path


# --- the straightforward scorer: one sample at a time, masks decoded to numpy -----------------------


def naive_score(task: str, gt_path: Path, pred_path: Path) -> dict:
    from pycocotools import mask as mask_utils

    def decode(r):
        return mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()}).astype(bool)

    preds = {}
    with open(pred_path) as f:
        for line in f:
            rec = json.loads(line)
            preds[rec["id"]] = rec
    sum_i = sum_u = 0
    sum_iou = 0.0
    n = 0
    nt = {"TP": 0, "FN": 0, "TN": 0, "FP": 0}
    with open(gt_path) as f:
        for line in f:
            rec = json.loads(line)
            target = rec["targets"][0]
            gt_mask = np.zeros((H, W), dtype=bool)
            for m in target["masks"]:
                gt_mask |= decode(m)
            seg = preds[rec["id"]]["segs"][0]
            pred_mask = np.zeros((H, W), dtype=bool)
            for inst in seg["instances"]:
                pred_mask |= decode(inst["mask"])
            pred_nt = (seg.get("exists") is not None and seg["exists"] < 0.5) or not seg["instances"]
            if task == "res":
                if pred_nt:
                    pred_mask[:] = False
                i = int(np.logical_and(pred_mask, gt_mask).sum())
                u = int(np.logical_or(pred_mask, gt_mask).sum())
                sum_iou += 1.0 if u == 0 else i / (u + 1e-5)
            else:  # ReLA refer_evaluation.py
                i = int(np.logical_and(pred_mask, gt_mask).sum())
                u = int(np.logical_or(pred_mask, gt_mask).sum())
                if not target["masks"]:
                    if pred_nt:
                        nt["TP"] += 1
                        sum_iou += 1.0
                        i = u = 0
                    else:
                        nt["FN"] += 1
                        i = 0
                else:
                    if pred_nt:
                        nt["FP"] += 1
                        i = 0
                    else:
                        nt["TN"] += 1
                    sum_iou += 0.0 if u == 0 else i / u
            sum_i += i
            sum_u += u
            n += 1
    if task == "res":
        return {"giou": sum_iou / n, "ciou": sum_i / (sum_u + 1e-10)}
    return {"giou": sum_iou / n, "ciou": sum_i / sum_u, "n_acc": nt["TP"] / (nt["TP"] + nt["FN"]), "t_acc": nt["TN"] / (nt["TN"] + nt["FP"])}


def worker(method: str, task: str, gt_path: Path, pred_path: Path, out: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from fclm.metrics import score  # imported before the RSS baseline

    import pycocotools.mask  # noqa: F401

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t, c = time.perf_counter(), time.process_time()
    if method == "ours":
        s = score(task, gt_path, pred_path, out)
        metrics = {k: s[k] for k in ("giou", "ciou", "n_acc", "t_acc") if k in s}
    else:
        metrics = naive_score(task, gt_path, pred_path)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": dt, "cpu_seconds": dc, "peak_rss_rise_mb": (rss1 - rss0) / 1024, "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "TASK", "GT", "PRED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, task, gt, pred = args.worker
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(worker(method, task, Path(gt), Path(pred), Path(d) / "out")))
        return

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for task in ("res", "gres"):
            t = time.perf_counter()
            gt, pred = make_data(Path(d), args.n, task)
            mb = (gt.stat().st_size + pred.stat().st_size) / 2**20
            print(f"[bench] {task}: wrote {args.n} GT + {args.n} predictions ({mb:.1f} MiB) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            runs = {}
            for method in ("ours", "naive"):
                results = []
                for _ in range(args.repeats):
                    proc = subprocess.run([sys.executable, __file__, "--worker", method, task, str(gt), str(pred)], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                runs[method] = results
            ours_m, naive_m = runs["ours"][0]["metrics"], runs["naive"][0]["metrics"]
            same = ours_m.keys() == naive_m.keys() and all(math.isclose(ours_m[k], naive_m[k], rel_tol=0, abs_tol=1e-12) for k in ours_m)
            if not same:
                raise SystemExit(f"[bench] {task}: results differ: ours {ours_m} vs naive {naive_m}")
            t_ours = float(np.median([r["seconds"] for r in runs["ours"]]))
            t_naive = float(np.median([r["seconds"] for r in runs["naive"]]))
            c_ours = float(np.median([r["cpu_seconds"] for r in runs["ours"]]))
            c_naive = float(np.median([r["cpu_seconds"] for r in runs["naive"]]))
            rows.append(
                {
                    "task": task,
                    "ours_s": t_ours,
                    "naive_s": t_naive,
                    "speedup": t_naive / t_ours,
                    "ours_cpu": c_ours,
                    "naive_cpu": c_naive,
                    "ours_mb": max(r["peak_rss_rise_mb"] for r in runs["ours"]),
                    "naive_mb": max(r["peak_rss_rise_mb"] for r in runs["naive"]),
                    "metrics": ours_m,
                }
            )
    print(f"\n{args.n} samples of 480×640, median of {args.repeats} runs each (fresh process; wall and CPU time without imports):\n")
    print("| task | ours wall (s) | naive wall (s) | speed-up wall | ours CPU (s) | naive CPU (s) | speed-up CPU | ours peak RSS rise (MiB) | naive peak RSS rise (MiB) | identical numbers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        shown = ", ".join(f"{k} {v:.6f}" for k, v in r["metrics"].items())
        print(
            f"| {r['task']} | {r['ours_s']:.2f} | {r['naive_s']:.2f} | {r['speedup']:.1f}× | {r['ours_cpu']:.2f} | {r['naive_cpu']:.2f} | "
            f"{r['naive_cpu'] / r['ours_cpu']:.1f}× | {r['ours_mb']:.0f} | {r['naive_mb']:.0f} | yes ({shown}) |"
        )


if __name__ == "__main__":
    main()
