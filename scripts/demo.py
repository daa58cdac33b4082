"""The main job: a tiny FCLM learns both directions on ShapesRef, on CPU, end to end.

    python scripts/demo.py [--out runs/demo] [--quick]      (scripts/demo.sh installs first, then runs this)

1. builds ShapesRef (``fclm-data synthetic``) and a tiny byte-level BPE on its training text;
2. scores the untrained model (the baseline), runs demo stage 1 and demo stage 2 (``fclm-train``);
3. answers and scores the held-out split with each exported model through ``fclm-eval run`` (=
   ``fclm-infer`` + ``fclm-eval score``; captions through ``fclm-infer``); measures ``<pos>`` self-reconstruction and the latent
   cosine between ``z_seg`` and ``z_pos`` on held-out DL-RES pairs;
4. writes overlays under ``OUT/overlays/``, ``OUT/summary.json`` and prints a table, each figure
   beside its baseline;
5. asks the final model one held-out question with ``fclm-chat`` one-shot: ``OUT/chat_example.png``
   and ``OUT/chat_example.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fclm.io import write_json, write_jsonl  # noqa: E402
from fclm.masks import decode_rle  # noqa: E402

# Held-out records scored per task (the first ones of each file, deterministic).
EVAL_LIMITS = {"res": 300, "region_caption": 150, "roc": 150, "dlres": 150}
QUICK_LIMITS = {"res": 12, "region_caption": 6, "roc": 6, "dlres": 6}


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if limit is not None and len(out) >= limit:
                    break
    return out


def build_data(out: Path, n_train: int, n_val: int) -> Path:
    from data_builders.__main__ import main as data_main

    data = out / "shapesref"
    if not (data / "manifest.json").is_file():
        rc = data_main(["synthetic", "--n", str(n_train), "--n-val", str(n_val), "--seed", "0", "--out", str(data)])
        if rc not in (0, None):
            raise SystemExit(f"ShapesRef build failed (exit {rc})")
    return data


def build_tokenizer(data: Path, out: Path) -> Path:
    """A byte-level BPE trained offline on ShapesRef's training text, saved for the model config."""
    from fclm.tokenizer import build_tiny_tokenizer

    path = out / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        corpus = [m["content"] for f in sorted(data.glob("train_*.jsonl")) for r in read_jsonl(f) for m in r["messages"]]
        build_tiny_tokenizer(vocab_size=1024, extra_corpus=corpus).save_pretrained(path)
    return path


def run_stage(config: str, overrides: list[str]) -> None:
    from train.__main__ import main as train_main

    rc = train_main([str(ROOT / "train" / "configs" / config), *overrides])
    if rc not in (0, None):
        raise SystemExit(f"training {config} failed (exit {rc})")


def eval_run(model_dir: Path, task: str, gt: list[dict], data: Path, out: Path) -> dict:
    """``fclm-eval run`` (= ``fclm-infer`` + ``fclm-eval score``) on held-out records; the summary it wrote.

    The records are written beside the data (image paths are relative to it) as ``eval_{task}_{n}.jsonl``,
    so the same command line can be rerun by hand; ``out/predictions.jsonl`` holds the answers.
    """
    from eval.__main__ import main as eval_main

    gt_path = data / f"eval_{task}_{len(gt)}.jsonl"
    if not gt_path.exists():
        write_jsonl(gt_path, gt)
    (out / "predictions.jsonl").unlink(missing_ok=True)  # fclm-eval run resumes; the demo answers afresh
    argv = ["run", "--model", str(model_dir), "--task", task, "--gt", str(gt_path), "--out", str(out),
            "--batch-size", "8", "--max-new-tokens", "40", "--no-progress"]
    rc = eval_main(argv)
    if rc != 0:
        raise SystemExit(f"fclm-eval {' '.join(argv)} failed (exit {rc})")
    return {**json.loads((out / "summary.json").read_text()), "command": "fclm-eval " + " ".join(argv)}


def infer(model_dir: Path, records: list[dict], data: Path, path: Path) -> list[dict]:
    """``fclm-infer`` over held-out records (for figures that are not a benchmark metric, e.g. caption F1)."""
    from infer.__main__ import main as infer_main

    gt_path = data / f"eval_{path.stem}_{len(records)}.jsonl"
    if not gt_path.exists():
        write_jsonl(gt_path, records)
    path.unlink(missing_ok=True)
    rc = infer_main(["--model", str(model_dir), "--data", str(gt_path), "--out", str(path), "--batch-size", "8",
                     "--max-new-tokens", "40", "--no-progress"])
    if rc != 0:
        raise SystemExit(f"fclm-infer on {gt_path} failed (exit {rc})")
    return read_jsonl(path)


def score(task: str, gt: list[dict], preds_path: Path, data: Path, out: Path) -> dict:
    from fclm.metrics import score as fclm_score

    gt_path = data / f"eval_{task}_{len(gt)}_{out.name}.jsonl"
    write_jsonl(gt_path, gt)
    try:
        return fclm_score(task, gt_path, preds_path, out)
    finally:
        gt_path.unlink(missing_ok=True)


def token_f1(pred: str, gt: str) -> float:
    """Bag-of-words F1 of lower-cased words (punctuation stripped)."""
    def words(s: str) -> Counter:
        return Counter("".join(c if c.isalnum() or c.isspace() else " " for c in s.lower()).split())

    p, g = words(pred), words(gt)
    common = sum((p & g).values())
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def region_figures(model, records: list[dict], data: Path) -> dict:
    """``<pos>`` self-reconstruction IoU (and its pooled-mask baseline) and the latent cosine of
    ``z_seg`` / ``z_pos`` on held-out DL-RES pairs (``fclm.training.probes``)."""
    from fclm.training.probes import latent_cosine, pos_reconstruction_iou

    absolute = [{**r, "image": str(data / r["image"])} for r in records]
    recon = pos_reconstruction_iou(model, absolute, batch_size=16)
    return {
        "pos_recon_iou": recon["pos_recon_miou"],
        "pos_recon_iou_pooled": recon["pos_recon_miou_pooled"],
        "latent_cos": latent_cosine(model, absolute, batch_size=16),
    }


def res_scores(model_dir: Path, name: str, val: dict, data: Path, out: Path) -> dict:
    """RES on all held-out records (``fclm-eval run``) and on images with ≥ 2 objects (its predictions, rescored)."""
    run_dir = out / f"run_{name}_res"
    full = eval_run(model_dir, "res", val["res"], data, run_dir)
    multi_ids = {r["id"] for r in val["res"] if val["objects_per_image"].get(r["image"], 0) >= 2}
    multi = [r for r in val["res"] if r["id"] in multi_ids]
    preds = [p for p in read_jsonl(run_dir / "predictions.jsonl") if p["id"] in multi_ids]
    write_jsonl(out / f"pred_{name}_res_multi.jsonl", preds)
    multi_score = score("res", multi, out / f"pred_{name}_res_multi.jsonl", data, out / f"score_{name}_res_multi")
    return {"giou": full["giou"], "ciou": full["ciou"], "giou_multi": multi_score["giou"], "n": len(val["res"]),
            "n_multi": len(multi), "command": full["command"], "predictions": run_dir / "predictions.jsonl"}


def all_objects_baseline(val: dict, data: Path, out: Path) -> float:
    """RES gIoU on the ≥2-object records of a 'model' that segments every object of the image (ignores the words)."""
    multi = [r for r in val["res"] if val["objects_per_image"].get(r["image"], 0) >= 2]
    preds = [{"id": r["id"], "text": "[SEG]", "segs": [{"instances": [{"mask": m} for m in val["object_masks"][r["image"]]]}]} for r in multi]
    write_jsonl(out / "pred_all_objects_multi.jsonl", preds)
    return score("res", multi, out / "pred_all_objects_multi.jsonl", data, out / "score_all_objects_multi")["giou"]


def caption_scores(model_dir: Path, name: str, val: dict, train_captions: list[str], data: Path, out: Path) -> dict:
    preds = infer(model_dir, val["region_caption"], data, out / f"pred_{name}_caption.jsonl")
    by_id = {p["id"]: p["text"] for p in preds}
    gts = {r["id"]: r["messages"][-1]["content"] for r in val["region_caption"]}
    constant = Counter(train_captions).most_common(1)[0][0]
    roc = eval_run(model_dir, "roc", val["roc"], data, out / f"run_{name}_roc")
    return {
        "caption_token_f1": float(np.mean([token_f1(by_id.get(i, ""), g) for i, g in gts.items()])),
        "caption_token_f1_constant": float(np.mean([token_f1(constant, g) for g in gts.values()])),
        "constant_caption": constant,
        "roc_siou": roc["siou"],
        "roc_ss": roc.get("ss"),
    }


def overlays(records: list[dict], predictions: Path, data: Path, out: Path) -> list[str]:
    """Image | ground truth | prediction (from the evaluation's own predictions), prompt and answer below."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    by_id = {p["id"]: p for p in read_jsonl(predictions)}
    paths = []
    for rec in records:
        pred = by_id.get(rec["id"], {"text": "", "segs": []})
        img = Image.open(data / rec["image"]).convert("RGB")
        w, h = img.size
        gt = np.zeros((h, w), bool)
        for t in rec["targets"]:
            for m in t["masks"]:
                gt |= decode_rle(m)
        pm = np.zeros((h, w), bool)
        for seg in pred["segs"]:
            for inst in seg["instances"]:
                pm |= decode_rle(inst["mask"])
        panels = [np.asarray(img)]
        for m, colour in ((gt, (0, 200, 0)), (pm, (230, 0, 0))):
            a = np.asarray(img).copy()
            a[m] = (0.4 * a[m] + 0.6 * np.array(colour)).astype(np.uint8)
            panels.append(a)
        scale = 3
        canvas = Image.new("RGB", (3 * w * scale, h * scale + 40), "white")
        for k, p in enumerate(panels):
            canvas.paste(Image.fromarray(p).resize((w * scale, h * scale), Image.NEAREST), (k * w * scale, 0))
        draw = ImageDraw.Draw(canvas)
        draw.text((4, h * scale + 4), "prompt: " + rec["messages"][0]["content"], fill="black")
        draw.text((4, h * scale + 20), "answer: " + pred["text"] + "   (image | ground truth | prediction)", fill="black")
        path = out / f"{rec['id']}.png"
        canvas.save(path)
        paths.append(str(path))
    return paths


def chat_example(model_dir: Path, record: dict, data: Path, out: Path) -> dict:
    """``fclm-chat`` one-shot on a held-out image: the overlay and JSON a user would get."""
    from infer.chat import main as chat_main

    argv = ["--model", str(model_dir), "--image", str(data / record["image"]), "--prompt", record["messages"][0]["content"],
            "--out", str(out / "chat_example.png"), "--json", str(out / "chat_example.json")]
    rc = chat_main(argv)
    if rc != 0:
        raise SystemExit(f"fclm-chat {' '.join(argv)} failed (exit {rc})")
    return {"command": "fclm-chat " + " ".join(argv), "png": str(out / "chat_example.png"), "json": str(out / "chat_example.json")}


def load_val(data: Path, limits: dict) -> dict:
    val = {t: read_jsonl(data / f"val_{t}.jsonl", limits[t]) for t in limits}
    gcg = read_jsonl(data / "val_gcg.jsonl")
    val["objects_per_image"] = {r["image"]: sum(len(t["masks"]) for t in r["targets"]) for r in gcg}
    val["object_masks"] = {r["image"]: [m for t in r["targets"] for m in t["masks"]] for r in gcg}
    return val


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--stage1-steps", type=int, default=None, help="override demo_stage1.yaml max_steps")
    ap.add_argument("--stage2-steps", type=int, default=None, help="override demo_stage2.yaml max_steps")
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, a few steps (for tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    limits = QUICK_LIMITS if args.quick else EVAL_LIMITS
    n_train, n_val = (40, 6) if args.quick else (args.n_train, args.n_val)
    s1 = args.stage1_steps or (4 if args.quick else None)
    s2 = args.stage2_steps or (2 if args.quick else None)

    from fclm.config import preset
    from fclm.model import FCLM, build_fclm

    data = build_data(out, n_train, n_val)
    tok_dir = build_tokenizer(data, out)
    val = load_val(data, limits)
    train_captions = [r["messages"][-1]["content"] for r in read_jsonl(data / "train_region_caption.jsonl")]
    evals = out / "eval"
    evals.mkdir(exist_ok=True)
    common = [f"data.root={data}", f"model.backbone.tokenizer={tok_dir}", f"sam_cache.dir={out / 'sam_cache'}",
              "logging.progress_bar=false"]
    if args.threads:
        common.append(f"cpu_threads={args.threads}")

    # The untrained baseline: the same initialisation stage 1 starts from (seed 0).
    cfg = preset("tiny")
    cfg.backbone.tokenizer = str(tok_dir)
    untrained_dir = out / "untrained"
    if not (untrained_dir / "fclm_config.json").is_file():
        torch.manual_seed(0)
        build_fclm(cfg).save_pretrained(untrained_dir)
    res0 = res_scores(untrained_dir, "untrained", val, data, evals)

    t1 = time.perf_counter()
    run_stage("demo_stage1.yaml", [f"output_dir={out / 'stage1'}", *common] + ([f"max_steps={s1}"] if s1 else []))
    t2 = time.perf_counter()
    stage1_dir = out / "stage1" / "export"
    dlres1 = eval_run(stage1_dir, "dlres", val["dlres"], data, evals / "run_stage1_dlres")
    region1 = region_figures(FCLM.from_pretrained(stage1_dir).eval(), val["dlres"], data)
    res1 = res_scores(stage1_dir, "stage1", val, data, evals)

    t3 = time.perf_counter()
    run_stage("demo_stage2.yaml", [f"output_dir={out / 'stage2'}", f"init_from={out / 'stage1' / 'export'}",
                                   *[c for c in common if not c.startswith("model.")]] + ([f"max_steps={s2}"] if s2 else []))
    t4 = time.perf_counter()
    final_dir = out / "stage2" / "export"
    res = res_scores(final_dir, "final", val, data, evals)
    dlres2 = eval_run(final_dir, "dlres", val["dlres"], data, evals / "run_stage2_dlres")
    region2 = region_figures(FCLM.from_pretrained(final_dir).eval(), val["dlres"], data)
    captions = caption_scores(final_dir, "final", val, train_captions, data, evals)
    overlay_paths = overlays(val["res"][:3], res["predictions"], data, out / "overlays")
    overlay_paths += overlays(val["dlres"][:2], evals / "run_stage2_dlres" / "predictions.jsonl", data, out / "overlays")
    chat = chat_example(final_dir, val["res"][0], data, out)

    summary = {
        "res_giou": res["giou"], "res_ciou": res["ciou"], "res_giou_untrained": res0["giou"],
        "res_giou_multi": res["giou_multi"], "res_giou_all_objects_multi": all_objects_baseline(val, data, evals),
        "pos_recon_iou": region2["pos_recon_iou"], "pos_recon_iou_pooled": region2["pos_recon_iou_pooled"],
        "caption_token_f1": captions["caption_token_f1"], "caption_token_f1_constant": captions["caption_token_f1_constant"],
        "roc_siou": captions["roc_siou"], "roc_ss": captions["roc_ss"],
        "dlres_giou_stage1": dlres1["giou"], "dlres_giou_stage2": dlres2["giou"],
        "latent_cos_start": region1["latent_cos"], "latent_cos_end": region2["latent_cos"],
        "pos_recon_iou_stage1": region1["pos_recon_iou"], "res_giou_stage1": res1["giou"],
        "wall_seconds": time.perf_counter() - start,
        "stage1_seconds": t2 - t1, "stage2_seconds": t4 - t3,
        "n_eval": {"res": res["n"], "res_multi": res["n_multi"], **{t: len(val[t]) for t in ("region_caption", "roc", "dlres")}},
        "constant_caption": captions["constant_caption"],
        "overlays": overlay_paths,
        "res_command": res["command"],
        "chat_example": chat,
        "quick": args.quick,
    }
    write_json(out / "summary.json", summary)
    print_table(summary)
    return summary


GOALS = [
    ("res_giou", "res_giou_untrained", "≥ 0.75"),
    ("res_giou_multi", "res_giou_all_objects_multi", "≥ 0.70 and ≥ baseline + 0.3"),
    ("pos_recon_iou", "pos_recon_iou_pooled", "≥ 0.9 and > baseline"),
    ("caption_token_f1", "caption_token_f1_constant", "≥ 0.8 and ≥ baseline + 0.3"),
    ("roc_siou", None, "≥ 0.8"),
    ("dlres_giou_stage2", "dlres_giou_stage1", "≥ stage 1"),
    ("latent_cos_end", "latent_cos_start", "> stage 1"),
    ("wall_seconds", None, "≤ 900"),
]


def print_table(summary: dict) -> None:
    print("\nFCLM demo summary (held-out ShapesRef)")
    print(f"| {'figure':<28} | {'value':>8} | {'baseline':<28} | {'value':>8} | goal")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 30}|{'-' * 10}|------")
    for key, base, goal in GOALS:
        b = f"{summary[base]:8.3f}" if base else " " * 8
        print(f"| {key:<28} | {summary[key]:8.3f} | {base or '':<28} | {b} | {goal}")
    print(f"\nres_ciou {summary['res_ciou']:.3f}; overlays in {Path(summary['overlays'][0]).parent if summary['overlays'] else '-'}")
    print(f"res_giou is reproduced by: {summary['res_command']}")
    print(f"one question, answered like a user would ask it: {summary['chat_example']['command']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
