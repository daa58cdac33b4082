"""The main job: a tiny FCLM learns both directions on ShapesRef, on CPU, end to end.

    python scripts/demo.py [--out runs/demo] [--quick] [--threads N] [--seed S] [--train-sam-encoder] [--heads]
                                                            (scripts/demo.sh installs first, then runs this with --heads)

1. builds ShapesRef (``fclm-data synthetic``) and a tiny byte-level BPE on its training text;
2. scores the untrained model (the baseline), runs demo stage 1 and demo stage 2 (``fclm-train``);
3. answers and scores the held-out split with each exported model through ``fclm-eval run`` (=
   ``fclm-infer`` + ``fclm-eval score``; captions through ``fclm-infer``); measures ``<pos>`` self-reconstruction and the latent
   cosine between ``z_seg`` and ``z_pos`` on held-out DL-RES pairs;
4. writes overlays under ``OUT/overlays/``, ``OUT/summary.json`` and prints a table, each figure
   beside its baseline; RES also per difficulty (``meta.difficulty`` of ShapesRef: the target told apart
   by colour alone, by colour and shape, or only by size or position), captions also as the number of
   held-out regions whose size and position words are right;
5. asks the final model one held-out question with ``fclm-chat`` one-shot: ``OUT/chat_example.png``
   and ``OUT/chat_example.json``.

With ``--heads`` it also runs ``scripts/demo_heads.py --c3vg-ablation`` (the C3VG and IGVG heads trained as
specialists, C3VG also without its consistency losses; ``OUT/heads_summary.json``) with the same shared
options: at one torch thread in a second process beside this one, so the two use the two cores (its
output goes to ``OUT/heads_demo.log`` and is printed at the end); with more threads, after this one.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import subprocess
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
DIFFICULTIES = ("colour_only", "needs_shape", "needs_size_or_position")
"""ShapesRef's ``meta.difficulty`` of a RES record (data_builders/synthetic.py)."""
GROUND_STEPS = 600
"""Stage 1's first phase: this many RES-only steps, then the reconstruction warm-up and the mixture of
demo_stage1.yaml from that phase's export. With the plain seg projector (``seg_query_norm: none``, the real
presets' wiring) the random tiny LLM routed the expression into h[SEG] within ~600 RES-only steps, but not
in 2,000 steps of the mixture, where captions and ROC share the LoRA and embedding updates; once routed, the
mixture kept and improved it (held-out RES gIoU 0.47 after the RES phase, 0.52 after 1,000 mixed steps;
docs/benchmarks.md, "Consistency learning")."""
DEFAULT_THREADS = 1
"""torch CPU threads unless ``--threads`` says otherwise. On an idle 2-core machine 2 threads are ~1.3×
faster, but while another job uses a core they spin-wait for each other and stage 1 fell from ~100 to ~4
samples/s (docs/benchmarks.md, "Threads on a shared CPU"); 1 thread stays near 75."""


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
    if not (data / "manifest.json").is_file() or not _has_difficulty(data / "val_res.jsonl"):
        rc = data_main(["synthetic", "--n", str(n_train), "--n-val", str(n_val), "--seed", "0", "--out", str(data)])
        if rc not in (0, None):
            raise SystemExit(f"ShapesRef build failed (exit {rc})")
    return data


def _has_difficulty(path: Path) -> bool:
    """Whether ShapesRef's RES records carry ``meta.difficulty`` (older builds do not: rebuilt)."""
    first = read_jsonl(path, 1) if path.is_file() else []
    return path.is_file() and (not first or "difficulty" in first[0].get("meta", {}))


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


def rescore_subset(task: str, records: list[dict], predictions: Path, subset: str, name: str, data: Path, out: Path) -> float | None:
    """gIoU of an evaluation's own predictions on a subset of its records (``None`` when the subset is empty)."""
    if not records:
        return None
    ids = {r["id"] for r in records}
    preds = [p for p in read_jsonl(predictions) if p["id"] in ids]
    write_jsonl(out / f"pred_{name}_{task}_{subset}.jsonl", preds)
    return score(task, records, out / f"pred_{name}_{task}_{subset}.jsonl", data, out / f"score_{name}_{task}_{subset}")["giou"]


def res_scores(model_dir: Path, name: str, val: dict, data: Path, out: Path) -> dict:
    """RES on all held-out records (``fclm-eval run``), then its predictions rescored on images with ≥ 2
    objects and per difficulty (``meta.difficulty``)."""
    run_dir = out / f"run_{name}_res"
    full = eval_run(model_dir, "res", val["res"], data, run_dir)
    preds = run_dir / "predictions.jsonl"
    multi = [r for r in val["res"] if val["objects_per_image"].get(r["image"], 0) >= 2]
    result = {"giou": full["giou"], "ciou": full["ciou"], "giou_multi": rescore_subset("res", multi, preds, "multi", name, data, out),
              "n": len(val["res"]), "n_multi": len(multi), "command": full["command"], "predictions": preds}
    for d in DIFFICULTIES:
        subset = [r for r in val["res"] if r["meta"].get("difficulty") == d]
        result[f"giou_{d}"] = rescore_subset("res", subset, preds, d, name, data, out)
        result[f"n_{d}"] = len(subset)
    return result


def all_objects_baseline(val: dict, data: Path, out: Path) -> float:
    """RES gIoU on the ≥2-object records of a 'model' that segments every object of the image (ignores the words)."""
    multi = [r for r in val["res"] if val["objects_per_image"].get(r["image"], 0) >= 2]
    preds = [{"id": r["id"], "text": "[SEG]", "segs": [{"instances": [{"mask": m} for m in val["object_masks"][r["image"]]]}]} for r in multi]
    write_jsonl(out / "pred_all_objects_multi.jsonl", preds)
    return score("res", multi, out / "pred_all_objects_multi.jsonl", data, out / "score_all_objects_multi")["giou"]


POSITION_PHRASE = re.compile(r"\b(in the center|on the (?:left|right)|at the (?:top|bottom)|in the (?:top|bottom) (?:left|right))\b")
SIZE_WORD = re.compile(r"\b(small|large)\b")


def caption_attributes(caption: str) -> tuple[str | None, str | None]:
    """(size word, position phrase) of a ShapesRef caption's first sentence ("A large red circle in the top left …")."""
    first = caption.lower().split(".")[0]
    size, where = SIZE_WORD.search(first), POSITION_PHRASE.search(first)
    return (size.group(1) if size else None), (where.group(1) if where else None)


def caption_scores(model_dir: Path, name: str, val: dict, train_captions: list[str], data: Path, out: Path) -> dict:
    """Token F1 against the constant caption, the held-out regions whose size / position words are right, and ROC."""
    preds = infer(model_dir, val["region_caption"], data, out / f"pred_{name}_caption.jsonl")
    by_id = {p["id"]: p["text"] for p in preds}
    gts = {r["id"]: r["messages"][-1]["content"] for r in val["region_caption"]}
    constant = Counter(train_captions).most_common(1)[0][0]
    right = {"size": 0, "position": 0}
    for i, g in gts.items():
        for key, p_attr, g_attr in zip(("size", "position"), caption_attributes(by_id.get(i, "")), caption_attributes(g)):
            right[key] += int(p_attr is not None and p_attr == g_attr)
    roc = eval_run(model_dir, "roc", val["roc"], data, out / f"run_{name}_roc")
    return {
        "caption_token_f1": float(np.mean([token_f1(by_id.get(i, ""), g) for i, g in gts.items()])),
        "caption_token_f1_constant": float(np.mean([token_f1(constant, g) for g in gts.values()])),
        "caption_size_right": right["size"],
        "caption_position_right": right["position"],
        "caption_n": len(gts),
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
    ap.add_argument("--ground-steps", type=int, default=GROUND_STEPS,
                    help=f"steps of stage 1's RES-only first phase (default {GROUND_STEPS}; 0: the mixture from the start)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, a few steps (for tests)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help=f"torch CPU threads (default {DEFAULT_THREADS}: fast on a shared machine; see DEFAULT_THREADS)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and of both stages' training")
    ap.add_argument("--train-sam-encoder", action="store_true",
                    help="stage 1 also trains the SAM image encoder (no SAM embedding cache; slower)")
    ap.add_argument("--heads", action="store_true",
                    help="also run scripts/demo_heads.py: beside this run at one thread (two cores), after it otherwise")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    print(f"[demo] torch CPU threads: {args.threads} (--threads; 1 stays fast when other jobs share the CPU)", flush=True)
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    limits = QUICK_LIMITS if args.quick else EVAL_LIMITS
    n_train, n_val = (40, 6) if args.quick else (args.n_train, args.n_val)
    s1 = args.stage1_steps or (4 if args.quick else None)
    s2 = args.stage2_steps or (2 if args.quick else None)

    from fclm.model import FCLM, build_fclm
    from fclm.training.config import load_train_config

    data = build_data(out, n_train, n_val)
    tok_dir = build_tokenizer(data, out)
    heads_argv = [a for a in argv if a != "--heads"]
    heads = HeadsDemo(heads_argv, out) if args.heads and args.threads == 1 else None  # after the data it reads
    val = load_val(data, limits)
    train_captions = [r["messages"][-1]["content"] for r in read_jsonl(data / "train_region_caption.jsonl")]
    evals = out / "eval"
    evals.mkdir(exist_ok=True)
    common = [f"data.root={data}", f"sam_cache.dir={out / 'sam_cache'}", "logging.progress_bar=false",
              f"cpu_threads={args.threads}", f"seed={args.seed}"]
    stage1_extra = ["trainability.sam_image_encoder=full", "sam_cache.enabled=false"] if args.train_sam_encoder else []
    if args.quick:
        stage1_extra += ["recon_warmup.steps=4", "recon_warmup.max_regions=16"]

    # The untrained baseline: the same initialisation stage 1 starts from (its seed, the model of its YAML).
    stage1_cfg = load_train_config(ROOT / "train" / "configs" / "demo_stage1.yaml",
                                   [f"model.backbone.tokenizer={tok_dir}", *common], check_files=False)
    cfg = stage1_cfg.model
    untrained_dir = out / "untrained"  # rebuilt every run (seconds): the config or seed may have changed
    torch.manual_seed(args.seed)
    build_fclm(cfg).save_pretrained(untrained_dir)
    res0 = res_scores(untrained_dir, "untrained", val, data, evals)

    t1 = time.perf_counter()
    # Stage 1 in two phases of demo_stage1.yaml (GROUND_STEPS explains why): RES only, then the reconstruction
    # warm-up and the whole mixture from that phase's export, for the remaining steps.
    s1_total = s1 or stage1_cfg.max_steps
    ground = min(2 if args.quick else args.ground_steps, s1_total - 1)
    stage1 = [f"output_dir={out / 'stage1'}", *common, *stage1_extra]
    if ground > 0:
        run_stage("demo_stage1.yaml", [f"output_dir={out / 'stage1_ground'}", f"model.backbone.tokenizer={tok_dir}",
                                       *common, *stage1_extra, "data.train=[{path: train_res.jsonl, weight: 1.0}]",
                                       "recon_warmup.steps=0", f"max_steps={ground}", f"checkpoint.every={ground}"])
        stage1 += ["model=null", f"init_from={out / 'stage1_ground' / 'export'}"]
    else:
        stage1 += [f"model.backbone.tokenizer={tok_dir}"]
    run_stage("demo_stage1.yaml", stage1 + [f"max_steps={s1_total - ground}"])
    t2 = time.perf_counter()
    stage1_dir = out / "stage1" / "export"
    dlres1 = eval_run(stage1_dir, "dlres", val["dlres"], data, evals / "run_stage1_dlres")
    region1 = region_figures(FCLM.from_pretrained(stage1_dir).eval(), val["dlres"], data)
    res1 = res_scores(stage1_dir, "stage1", val, data, evals)

    t3 = time.perf_counter()
    run_stage("demo_stage2.yaml", [f"output_dir={out / 'stage2'}", f"init_from={out / 'stage1' / 'export'}", *common]
              + ([f"max_steps={s2}"] if s2 else []))
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
        **{f"res_giou_{d}": res[f"giou_{d}"] for d in DIFFICULTIES},
        **{f"res_giou_{d}_untrained": res0[f"giou_{d}"] for d in DIFFICULTIES},
        "pos_recon_iou": region2["pos_recon_iou"], "pos_recon_iou_pooled": region2["pos_recon_iou_pooled"],
        "caption_token_f1": captions["caption_token_f1"], "caption_token_f1_constant": captions["caption_token_f1_constant"],
        "caption_size_right": captions["caption_size_right"], "caption_position_right": captions["caption_position_right"],
        "caption_size_right_frac": captions["caption_size_right"] / max(1, captions["caption_n"]),
        "caption_position_right_frac": captions["caption_position_right"] / max(1, captions["caption_n"]),
        "roc_siou": captions["roc_siou"], "roc_ss": captions["roc_ss"],
        "dlres_giou_stage1": dlres1["giou"], "dlres_giou_stage2": dlres2["giou"],
        "latent_cos_start": region1["latent_cos"], "latent_cos_end": region2["latent_cos"],
        "pos_recon_iou_stage1": region1["pos_recon_iou"], "res_giou_stage1": res1["giou"],
        "wall_seconds": time.perf_counter() - start,
        "stage1_seconds": t2 - t1, "stage2_seconds": t4 - t3,
        "n_eval": {"res": res["n"], "res_multi": res["n_multi"], **{f"res_{d}": res[f"n_{d}"] for d in DIFFICULTIES},
                   **{t: len(val[t]) for t in ("region_caption", "roc", "dlres")}},
        "threads": args.threads, "seed": args.seed, "train_sam_encoder": args.train_sam_encoder,
        "seg_query_norm": cfg.seg_query_norm,
        "load_average": os.getloadavg(),
        "constant_caption": captions["constant_caption"],
        "overlays": overlay_paths,
        "res_command": res["command"],
        "chat_example": chat,
        "quick": args.quick,
    }
    write_json(out / "summary.json", summary)
    print_table(summary)
    if args.heads:
        if heads is None:  # more than one thread: the heads demo after this one
            heads = HeadsDemo(heads_argv, out)
        heads.finish()
        summary["demo_and_heads_wall_seconds"] = time.perf_counter() - start
        write_json(out / "summary.json", summary)
        print(f"\nthe whole demo (this and the heads demo) took {summary['demo_and_heads_wall_seconds']:.0f} s "
              f"(goal ≤ 900 s)")
    return summary


class HeadsDemo:
    """``scripts/demo_heads.py`` in a child process (output to ``OUT/heads_demo.log``); :meth:`finish`
    waits for it, prints its output and fails the demo when it failed."""

    def __init__(self, argv: list[str], out: Path) -> None:
        self.log = out / "heads_demo.log"
        # also C3VG without its consistency losses: the figure its consistency goal is compared with
        cmd = [sys.executable, str(ROOT / "scripts" / "demo_heads.py"), *argv, "--c3vg-ablation"]
        print(f"[demo] heads demo started: {' '.join(cmd)} (log: {self.log})", flush=True)
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        atexit.register(self._stop)  # a failing main demo does not leave the heads demo running

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def finish(self) -> None:
        rc = self.proc.wait()
        print(f"\n[demo] heads demo ({self.log}):", flush=True)
        text = self.log.read_text()
        table = text.rfind("heads on held-out ShapesRef")  # its summary table, or the end of a failed run
        print(text[table if table >= 0 else max(0, len(text) - 4000):].strip(), flush=True)
        if rc != 0:
            raise SystemExit(f"the heads demo failed (exit {rc}); its log: {self.log}")


GOALS = [
    ("res_giou", "res_giou_untrained", "≥ 0.6"),
    ("res_giou_colour_only", "res_giou_colour_only_untrained", "≥ 0.8"),
    ("res_giou_needs_shape", "res_giou_needs_shape_untrained", ""),
    ("res_giou_needs_size_or_position", "res_giou_needs_size_or_position_untrained", ""),
    ("res_giou_multi", "res_giou_all_objects_multi", "≥ baseline + 0.3"),
    ("pos_recon_iou", "pos_recon_iou_pooled", "≥ 0.9 and > baseline"),
    ("caption_token_f1", "caption_token_f1_constant", "≥ 0.8 and ≥ baseline + 0.15"),
    ("caption_size_right_frac", None, "≥ 0.8"),
    ("caption_position_right_frac", None, "≥ 0.5"),
    ("roc_siou", None, "≥ 0.8"),
    ("dlres_giou_stage2", "dlres_giou_stage1", "≥ stage 1"),
    ("latent_cos_end", "latent_cos_start", "> stage 1"),
    ("wall_seconds", None, "≤ 900"),
]


def _fmt(value: float | None) -> str:
    return "       -" if value is None else f"{value:8.3f}"


def print_table(summary: dict) -> None:
    print("\nFCLM demo summary (held-out ShapesRef)")
    print(f"| {'figure':<32} | {'value':>8} | {'baseline':<42} | {'value':>8} | goal")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 44}|{'-' * 10}|------")
    for key, base, goal in GOALS:
        b = _fmt(summary[base]) if base else " " * 8
        print(f"| {key:<32} | {_fmt(summary[key])} | {base or '':<42} | {b} | {goal}")
    n = summary["n_eval"]
    print(f"\nres_ciou {summary['res_ciou']:.3f}; RES records: {n['res']} ({n['res_multi']} on images with ≥ 2 objects; "
          f"{n['res_colour_only']} colour only, {n['res_needs_shape']} need shape, {n['res_needs_size_or_position']} need size "
          f"or position); captions with the right size {summary['caption_size_right']} / {n['region_caption']}, "
          f"position {summary['caption_position_right']} / {n['region_caption']}")
    print(f"threads {summary['threads']}, seed {summary['seed']}, seg_query_norm {summary['seg_query_norm']}, "
          f"SAM image encoder trained: {summary['train_sam_encoder']}; stage 1 {summary['stage1_seconds']:.0f} s, "
          f"stage 2 {summary['stage2_seconds']:.0f} s; overlays in "
          f"{Path(summary['overlays'][0]).parent if summary['overlays'] else '-'}")
    print(f"res_giou is reproduced by: {summary['res_command']}")
    print(f"one question, answered like a user would ask it: {summary['chat_example']['command']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
