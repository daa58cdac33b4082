"""Inference benchmark: the cached-image predictor, the single-pass [SEG] path, batched records, memory.

    python scripts/bench/inference.py [--preset small] [--reps 7] [--records 32] [--batch-size 8]
    python scripts/bench/inference.py --quick        # tiny preset, few reps: a smoke run in seconds

A random model built from the preset's config (``build_fclm(preset(...))``, no downloads), CPU float32,
one torch thread (``--threads``), ``torch.set_flush_denormal(True)``. Synthetic images (coloured
rectangles on a gradient, assorted sizes) and questions (short, long, one with a ``<region>`` box).

1. ``FCLMPredictor``: ``set_image`` + ``ask`` on a new image vs ``ask`` alone for a later question on
   the image already set. Per image the three questions are asked in turn, the first after
   ``set_image``; the first question rotates with the image, so each question is timed both ways, and
   the figure is Σ over questions of the median "new" time ÷ Σ of the median "later" time. Rigged
   model (answers ``[SEG]``: the grounding path) and the plain random model (``--max-new-tokens``).
2. The two-pass path that predicted before the single-pass decoder (:func:`two_pass_reference`: HF
   ``generate`` over the image and region features, then a teacher-forced forward over prompt + answer
   whose ``[SEG]`` states the heads decode) vs :func:`fclm.inference.answer_batch`, one prompt at a
   time, the two alternating, rigged model; the figure is the ratio of the sums of per-prompt medians.
   The outputs are compared (tokens, text, masks: IoU), for the plain model's answers too.
3. :func:`fclm.inference.predict_records` throughput (records/s) at batch size 1 vs ``--batch-size``
   over ``--records`` records (mixed prompt lengths, a third with a ``<region>``), after a warm-up;
   passes alternate; the figure is the ratio of the median rates. The plain random model with a fixed
   ``max_new_tokens`` (random weights rarely stop early, so every record generates the same number of
   tokens; the table says how many), and the rigged model (2-token answers: encoding and prefill left).
4. Peak memory: each case again in a fresh process; after the model and inputs are built the
   kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), the case runs, and ``VmHWM`` is read.
   Reported: that peak (model weights included) and its rise over the RSS just before the case.

Also a breakdown of where the time goes (exclusive wall time of the vision tower, SAM encoder, LM
prefill / full-sequence forwards, LM one-token steps, heads, preprocessing …), measured on separate
runs with timers wrapped around those functions. Prints Markdown tables; every goal beside its figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GOALS = {"ask": 3.0, "single_pass": 1.5, "records": 3.0}
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------
# model and inputs
# --------------------------------------------------------------------------------------------------


def setup(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def build_model(preset_name: str, rigged: bool):
    from fclm.config import preset
    from fclm.model import build_fclm
    from fclm.testing import rig_seg_answers

    torch.manual_seed(0)
    model = build_fclm(preset(preset_name)).eval()
    return rig_seg_answers(model) if rigged else model


def make_images(n: int, seed: int = 0) -> list[tuple[Image.Image, list[float]]]:
    """n RGB images (assorted sizes) of coloured rectangles on a gradient, each with one object's box (xyxy)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(200, 400)), int(rng.integers(240, 480))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 200 // w, yy * 200 // h, np.full((h, w), 60)], -1).astype(np.uint8)
        box = None
        for _ in range(3):
            bh, bw = int(rng.integers(h // 6, h // 2)), int(rng.integers(w // 6, w // 2))
            y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
            img[y0 : y0 + bh, x0 : x0 + bw] = rng.integers(60, 255, 3)
            box = [float(x0), float(y0), float(x0 + bw), float(y0 + bh)]
        out.append((Image.fromarray(img), box))
    return out


LONG = ("Look carefully at the whole picture, the colours, the shapes and where each of them sits. "
        "There are several rectangles; one of them is larger than the others and lies close to an edge. "
        "Please segment the largest rectangle, the one nearest to the edge of the image.")
QUESTIONS = [  # (text, has a region)
    ("Please segment the red rectangle.", False),
    (LONG, False),
    ("What is <region>? Describe it in a few words.", True),
]


def box_mask(box: list[float], h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    m[y0:y1, x0:x1] = True
    return m


def prompt_batch(model, image: Image.Image, box: list[float], question: int) -> dict:
    """A one-prompt, left-padded generation batch (as ``predict_records`` makes it)."""
    from fclm.masks import encode_mask

    text, has_region = QUESTIONS[question]
    regions = [{"mask": encode_mask(box_mask(box, image.height, image.width))}] if has_region else []
    record = {"id": f"q{question}", "messages": [{"role": "user", "content": text}], "regions": regions}
    encoded = model.processor.encode_record(record, image, add_generation_prompt=True)
    return model.processor.collate([encoded], padding_side="left")


def write_records(root: Path, images: list[tuple[Image.Image, list[float]]], n: int) -> list[dict]:
    """n schema records over the images (saved as PNG under root): the three question kinds in turn."""
    from fclm.masks import encode_mask

    for i, (img, _) in enumerate(images):
        img.save(root / f"img{i}.png")
    records = []
    for r in range(n):
        i = r % len(images)
        img, box = images[i]
        text, has_region = QUESTIONS[r % len(QUESTIONS)]
        regions = [{"mask": encode_mask(box_mask(box, img.height, img.width))}] if has_region else []
        records.append({"id": f"r{r}", "image": f"img{i}.png", "messages": [{"role": "user", "content": text}],
                        "regions": regions})
    return records


# --------------------------------------------------------------------------------------------------
# the two-pass reference (the path before the single-pass decoder)
# --------------------------------------------------------------------------------------------------


def teacher_forced_batch(batch: dict, answer_ids: torch.Tensor) -> dict:
    """``batch`` (one prompt) extended by ``answer_ids``: labels -100 on the prompt, the answer ids after."""
    full = dict(batch)
    prompt = batch["input_ids"]
    answer = answer_ids.view(1, -1).to(prompt)
    full["input_ids"] = torch.cat([prompt, answer], dim=1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
    full["labels"] = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer], dim=1)
    return full


@torch.no_grad()
def two_pass_reference(model, batch: dict, max_new_tokens: int) -> dict:
    """Pass 1: ``model.generate`` (HF generate over the image and region features); pass 2, if the answer has
    a ``[SEG]``: a teacher-forced ``model(full_batch)`` over prompt + answer + ``<|im_end|>`` whose ``[SEG]``
    hidden states the heads decode. Both passes run the vision tower and SAM encoder. B = 1."""
    ids = model.token_ids
    generated = model.generate(batch, max_new_tokens=max_new_tokens)[0]
    stop = (generated == ids["im_end"]) | (generated == ids["pad"])
    end = int(stop.nonzero()[0, 0]) if bool(stop.any()) else generated.shape[0]
    answer = generated[:end]
    masks: list[np.ndarray] = []
    if bool((answer == ids["seg"]).any()):
        outputs = model(teacher_forced_batch(batch, torch.cat([answer, answer.new_tensor([ids["im_end"]])])))
        n_seg = int(outputs["seg_batch_index"].shape[0])
        masks = [None] * n_seg
        for head in outputs["heads"].values():
            logits = model.sam.postprocess_masks(head["pred_masks"], batch["sam_valid_hw"][0], batch["original_hw"][0])
            for j, q in enumerate(head["query_index"].tolist()):
                masks[q] = (logits[j] > 0).cpu().numpy()
    text = model.processor.tokenizer.decode(answer.tolist(), skip_special_tokens=False)
    return {"tokens": answer.tolist(), "text": text, "masks": masks}


@torch.no_grad()
def single_pass_tokens(model, batch: dict, max_new_tokens: int) -> dict:
    """The single-pass answer with its token ids (the decoder's yielded steps), for the equality check."""
    from fclm.inference.decoding import SamplingConfig
    from fclm.inference.predictor import _answer_steps

    stop = {model.token_ids["im_end"], model.token_ids["eos"]}
    steps = _answer_steps(model, batch, model.encode_images(batch), sampling=SamplingConfig(max_new_tokens=max_new_tokens))
    tokens = []
    while True:
        try:
            t = next(steps)[0]
        except StopIteration as done:
            answer = done.value[0]
            break
        if t is not None and t not in stop:
            tokens.append(t)
    h, w = answer.image_size
    return {"tokens": tokens, "text": answer.text, "masks": [s.union(h, w) for s in answer.segments]}


def compare(ref: dict, new: dict) -> dict:
    ious = []
    for a, b in zip(ref["masks"], new["masks"]):
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
    return {"same_tokens": ref["tokens"] == new["tokens"], "same_text": ref["text"] == new["text"],
            "same_seg_count": len(ref["masks"]) == len(new["masks"]), "ious": ious,
            "mask_pixels": [int(m.sum()) for m in ref["masks"]]}


# --------------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall s, process CPU s, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


class Breakdown:
    """Exclusive wall time of wrapped functions (an inner wrapped call is taken out of its caller's time)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[float] = []  # time spent in wrapped children of each open call

    def wrap(self, obj: Any, attr: str, label: str | Callable[..., str]) -> None:
        fn = getattr(obj, attr)

        @functools.wraps(fn)  # keeps the signature: the decoder inspects the LM's forward for its cache argument
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = label(*args, **kwargs) if callable(label) else label
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                children = self._stack.pop()
                self.total[name] = self.total.get(name, 0.0) + dt - children
                self.calls[name] = self.calls.get(name, 0) + 1
                if self._stack:
                    self._stack[-1] += dt

        setattr(obj, attr, wrapper)

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()


def _lm_label(*args: Any, **kwargs: Any) -> str:
    x = kwargs.get("inputs_embeds")
    if x is None:
        x = kwargs.get("input_ids", args[0] if args else None)
    return "LM one-token steps" if x is not None and x.shape[1] == 1 else "LM prefill / full sequence"


def instrument(model) -> Breakdown:
    """Wrap the parts where inference time goes (instance attributes; the model's code is unchanged)."""
    bd = Breakdown()
    qwen = model.qwen
    bd.wrap(model.processor, "encode_image", "image preprocessing (Qwen patches, SAM frame)")
    bd.wrap(model.processor, "encode_record", "prompt encoding (tokens, region masks, crops)")
    bd.wrap(model.processor, "collate", "collate")
    bd.wrap(qwen.model, "get_image_features", "Qwen vision tower")
    bd.wrap(model.sam, "encode", "SAM image encoder (images, region crops)")
    bd.wrap(model.sam, "decode_prompts", "SAM decode of region prompts (box → mask)")
    bd.wrap(model.region_extractor, "forward", "region extractor")
    bd.wrap(qwen.model.language_model, "forward", _lm_label)
    for head in model.heads.values():
        bd.wrap(head, "forward", "grounding head (SAM decoder)")
    bd.wrap(model.sam, "postprocess_masks", "mask upsampling to the image")
    return bd


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------------------------------
# 1. predictor: new image vs second question
# --------------------------------------------------------------------------------------------------


def ask_plan(n_images: int) -> list[tuple[int, int, int]]:
    """(image, first question, second question): the questions rotate so each kind is first and second."""
    n = len(QUESTIONS)
    return [(i, i % n, (i + 1) % n) for i in range(n_images)]


def ask_args(question: int, box: list[float]) -> tuple[str, list]:
    text, has_region = QUESTIONS[question]
    return text, [{"box": box}] if has_region else []


def bench_ask(model, images, reps: int, max_new_tokens: int, warmup: int = 1) -> dict:
    """Per image: set_image + the first question (timed as "new"), then each other question (timed as "later",
    ask only). The first question rotates with the image, so every question kind is timed both ways; the
    figure compares the same questions: Σ over kinds of the median new time ÷ Σ of the median later time."""
    from fclm.inference import FCLMPredictor

    p = FCLMPredictor(model)
    n = len(QUESTIONS)
    new: dict[int, list[tuple[float, float]]] = {q: [] for q in range(n)}
    later: dict[int, list[tuple[float, float]]] = {q: [] for q in range(n)}
    tokens = set()
    for rep in range(warmup + reps):
        for i, (img, box) in enumerate(images):
            order = [(i + k) % n for k in range(n)]
            for k, q in enumerate(order):
                if k == 0:
                    wall, cpu, a = timed(lambda: (p.set_image(img), p.ask(*ask_args(q, box), max_new_tokens=max_new_tokens))[1])
                else:
                    wall, cpu, a = timed(lambda: p.ask(*ask_args(q, box), max_new_tokens=max_new_tokens))
                if rep >= warmup:
                    (later if k else new)[q].append((wall, cpu))
                    tokens.add(a.completion_tokens)

    def medians(d: dict, j: int) -> list[float]:
        return [med([x[j] for x in d[q]]) for q in range(n)]

    new_w, later_w, new_c, later_c = medians(new, 0), medians(later, 0), medians(new, 1), medians(later, 1)
    return {"new_ms": 1e3 * sum(new_w) / n, "second_ms": 1e3 * sum(later_w) / n,
            "new_cpu_ms": 1e3 * sum(new_c) / n, "second_cpu_ms": 1e3 * sum(later_c) / n,
            "ratio": sum(new_w) / sum(later_w), "cpu_ratio": sum(new_c) / sum(later_c),
            "per_question": [a / b for a, b in zip(new_w, later_w)],
            "n_new": sum(len(v) for v in new.values()), "n_later": sum(len(v) for v in later.values()),
            "tokens": sorted(tokens)}


# --------------------------------------------------------------------------------------------------
# 2. two-pass vs single pass
# --------------------------------------------------------------------------------------------------


def bench_passes(model, batches: list[dict], reps: int, max_new_tokens: int) -> dict:
    from fclm.inference import SamplingConfig, answer_batch

    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    variants = {"two": lambda b: two_pass_reference(model, b, max_new_tokens),
                "single": lambda b: answer_batch(model, b, sampling=sampling)}
    times: dict[str, list[list[float]]] = {k: [[] for _ in batches] for k in ("two", "single", "two_cpu", "single_cpu")}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for k, b in enumerate(batches):
            order = ["two", "single"] if (rep + k) % 2 else ["single", "two"]
            for name in order:
                wall, cpu, _ = timed(lambda: variants[name](b))
                if rep:
                    times[name][k].append(wall)
                    times[f"{name}_cpu"][k].append(cpu)
    # per prompt the median over reps; the figure is the ratio of their sums (the same prompts both ways)
    tot = {name: sum(med(x) for x in per_prompt) for name, per_prompt in times.items()}
    m = len(batches)
    return {"two_ms": 1e3 * tot["two"] / m, "single_ms": 1e3 * tot["single"] / m,
            "two_cpu_ms": 1e3 * tot["two_cpu"] / m, "single_cpu_ms": 1e3 * tot["single_cpu"] / m,
            "ratio": tot["two"] / tot["single"], "cpu_ratio": tot["two_cpu"] / tot["single_cpu"], "n": reps * m}


def check_passes(model, batches: list[dict], max_new_tokens: int) -> dict:
    results = [compare(two_pass_reference(model, b, max_new_tokens), single_pass_tokens(model, b, max_new_tokens))
               for b in batches]
    ious = [x for r in results for x in r["ious"]]
    return {"prompts": len(results), "same_tokens": sum(r["same_tokens"] for r in results),
            "same_text": sum(r["same_text"] for r in results), "same_seg_count": sum(r["same_seg_count"] for r in results),
            "segs": len(ious), "min_iou": min(ious) if ious else None,
            "mask_pixels": [p for r in results for p in r["mask_pixels"]]}


# --------------------------------------------------------------------------------------------------
# 3. predict_records throughput
# --------------------------------------------------------------------------------------------------


def run_records(model, records: list[dict], root: Path, batch_size: int, max_new_tokens: int) -> list[dict]:
    from fclm.inference import SamplingConfig, predict_records

    return list(predict_records(model, records, root, batch_size=batch_size,
                                sampling=SamplingConfig(max_new_tokens=max_new_tokens)))


def bench_records(model, records: list[dict], root: Path, batch_size: int, reps: int, max_new_tokens: int) -> dict:
    sizes = [1, batch_size]
    run_records(model, records[: 2 * batch_size], root, batch_size, max_new_tokens)  # warm-up
    run_records(model, records[:2], root, 1, max_new_tokens)
    rates: dict[int, list[float]] = {s: [] for s in sizes}
    cpu: dict[int, list[float]] = {s: [] for s in sizes}
    tokens = {}
    for rep in range(reps):
        for s in (sizes if rep % 2 == 0 else sizes[::-1]):
            wall, c, preds = timed(lambda: run_records(model, records, root, s, max_new_tokens))
            rates[s].append(len(records) / wall)
            cpu[s].append(len(records) / c)
            tokens[s] = sum(p["usage"]["completion_tokens"] for p in preds)
    return {"rate_1": med(rates[1]), "rate_b": med(rates[batch_size]), "ratio": med(rates[batch_size]) / med(rates[1]),
            "cpu_ratio": med(cpu[batch_size]) / med(cpu[1]),
            "cpu_rate_1": med(cpu[1]), "cpu_rate_b": med(cpu[batch_size]), "tokens_1": tokens[1], "tokens_b": tokens[batch_size],
            "n": reps}


# --------------------------------------------------------------------------------------------------
# breakdown runs
# --------------------------------------------------------------------------------------------------


def breakdown_cases(args, images, records, root) -> dict[str, dict]:
    """Per case, the exclusive time of each part over one pass of its items: the pass (of ``--breakdown-reps``,
    after a warm-up pass) whose total is the median, so that one slow moment does not skew a part."""
    from fclm.inference import FCLMPredictor, SamplingConfig, answer_batch

    out: dict[str, dict] = {}
    n = args.max_new_tokens
    plan = ask_plan(len(images))

    def measure(bd: Breakdown, items: list, call: Callable[[Any], Any], before: Callable[[Any], Any] | None = None) -> dict:
        passes = []
        for rep in range(1 + args.breakdown_reps):  # rep 0: warm-up
            acc = {"_parts": {}, "_total": 0.0, "_count": 0}
            for item in items:
                if before is not None:
                    before(item)
                bd.reset()
                acc["_total"] += timed(lambda: call(item))[0]
                acc["_count"] += 1
                for k, v in bd.total.items():
                    acc["_parts"][k] = acc["_parts"].get(k, 0.0) + v
            if rep:
                passes.append(acc)
        passes.sort(key=lambda a: a["_total"])
        return passes[len(passes) // 2]

    for rigged in (True, False):
        model = build_model(args.preset, rigged)
        bd = instrument(model)
        p = FCLMPredictor(model)
        tag = "[SEG]" if rigged else f"{n} tok"

        def new_ask(item):
            i, q1, _ = item
            p.set_image(images[i][0])
            p.ask(*ask_args(q1, images[i][1]), max_new_tokens=n)

        def second_ask(item):
            i, _, q2 = item
            p.ask(*ask_args(q2, images[i][1]), max_new_tokens=n)

        out[f"new image + ask ({tag})"] = measure(bd, plan, new_ask)
        # the image is set and a first question asked (untimed); only the second question is timed
        out[f"later ask ({tag})"] = measure(bd, plan, second_ask, before=new_ask)
        if rigged:
            batches = [prompt_batch(model, images[i][0], images[i][1], q) for i, q, _ in plan]
            sampling = SamplingConfig(max_new_tokens=n)
            out["two-pass reference ([SEG])"] = measure(bd, batches, lambda b: two_pass_reference(model, b, n))
            out["single pass ([SEG])"] = measure(bd, batches, lambda b: answer_batch(model, b, sampling=sampling))
        else:
            for s in (1, args.batch_size):
                chunks = [records[j : j + s] for j in range(0, len(records), s)]
                r = measure(bd, chunks, lambda chunk: run_records(model, chunk, root, s, n))
                r["_count"] = len(records)
                out[f"predict_records b={s} ({n} tok), per record"] = r
    return out


def print_breakdown(cases: dict[str, dict]) -> None:
    names = list(cases)
    parts: list[str] = []
    for c in cases.values():
        for k in c["_parts"]:
            if k not in parts:
                parts.append(k)
    print("| ms per item (exclusive) | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for k in parts:
        cells = [f"{1e3 * cases[n]['_parts'].get(k, 0.0) / cases[n]['_count']:.1f}" for n in names]
        print(f"| {k} | " + " | ".join(cells) + " |")
    others = [1e3 * (c["_total"] - sum(c["_parts"].values())) / c["_count"] for c in cases.values()]
    print("| other (Python, embedding, sampling, …) | " + " | ".join(f"{o:.1f}" for o in others) + " |")
    print("| **total** | " + " | ".join(f"**{1e3 * c['_total'] / c['_count']:.1f}**" for c in cases.values()) + " |")


# --------------------------------------------------------------------------------------------------
# 4. memory, one case per process
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def mem_case(case: dict) -> dict:
    """Run one case in this (fresh) process; peak RSS during it (the mark reset first) and the rise over the RSS before."""
    from fclm.inference import FCLMPredictor, SamplingConfig, answer_batch

    setup(case["threads"])
    kind = case["case"]
    rigged = not kind.startswith("records") or kind.endswith("seg")
    model = build_model(case["preset"], rigged)
    images = make_images(case["images"])
    n = case["max_new_tokens"]
    plan = ask_plan(len(images))
    p = FCLMPredictor(model)
    if kind == "ask_new":
        def run():
            for i, q1, _ in plan:
                p.set_image(images[i][0])
                p.ask(*ask_args(q1, images[i][1]), max_new_tokens=n)
    elif kind == "ask_second":
        p.set_image(images[0][0])

        def run():
            for _, q1, q2 in plan:
                p.ask(*ask_args(q2, images[0][1]), max_new_tokens=n)
    elif kind in ("two_pass", "single_pass"):
        batches = [prompt_batch(model, images[i][0], images[i][1], q) for i, q, _ in plan]
        sampling = SamplingConfig(max_new_tokens=n)

        def run():
            for b in batches:
                two_pass_reference(model, b, n) if kind == "two_pass" else answer_batch(model, b, sampling=sampling)
    else:  # records_1, records_b, records_b_seg
        root = Path(case["root"])
        records = json.loads((root / "records.json").read_text())
        size = 1 if kind.startswith("records_1") else case["batch_size"]

        def run():
            run_records(model, records, root, size, n)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    run()
    peak = _status_kib("VmHWM")
    return {"peak_mib": peak / 1024, "rise_mib": (peak - before) / 1024}


def spawn_mem(case: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--mem-case", json.dumps(case)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def met(value: float, goal: float) -> str:
    return "yes" if value >= goal else "no"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions of each measurement (after a warm-up)")
    ap.add_argument("--images", type=int, default=6, help="distinct images (and prompts per rep in part 2)")
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--record-reps", type=int, default=3, help="timed passes over the records per batch size")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--breakdown-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="run the per-case memory processes (default: on, off with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, few reps (smoke run)")
    ap.add_argument("--mem-case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_case:
        print(json.dumps(mem_case(json.loads(args.mem_case))))
        return
    if args.quick:
        args.preset, args.reps, args.images, args.records, args.record_reps, args.breakdown_reps = "tiny", 2, 3, 16, 1, 1
    if args.memory is None:
        args.memory = not args.quick
    setup(args.threads)
    t_start = time.perf_counter()
    n = args.max_new_tokens
    images = make_images(args.images)
    tmp = tempfile.TemporaryDirectory(prefix="fclm-bench-inference-")
    root = Path(tmp.name)
    records = write_records(root, images, args.records)
    (root / "records.json").write_text(json.dumps(records))

    print(f"# Inference benchmark: preset {args.preset}, CPU float32, {args.threads} torch thread(s)\n")
    seg_model = build_model(args.preset, rigged=True)
    plain_model = build_model(args.preset, rigged=False)

    ask_seg = bench_ask(seg_model, images, args.reps, n)
    ask_plain = bench_ask(plain_model, images, args.reps, n)
    plan = ask_plan(len(images))
    seg_batches = [prompt_batch(seg_model, images[i][0], images[i][1], q) for i, q, _ in plan]
    plain_batches = [prompt_batch(plain_model, images[i][0], images[i][1], q) for i, q, _ in plan]
    lengths = []  # per question kind: (prompt tokens, image tokens) over the images
    for q in range(len(QUESTIONS)):
        bs = [prompt_batch(seg_model, img, box, q) for img, box in images]
        lengths.append(([int(x["attention_mask"].sum()) for x in bs],
                        [int((x["input_ids"] == seg_model.token_ids["image_pad"]).sum()) for x in bs]))
    check_seg = check_passes(seg_model, seg_batches, n)
    check_plain = check_passes(plain_model, plain_batches, n)
    passes = bench_passes(seg_model, seg_batches, args.reps, n)
    rec_plain = bench_records(plain_model, records, root, args.batch_size, args.record_reps, n)
    rec_seg = bench_records(seg_model, records, root, args.batch_size, args.record_reps, n)
    del seg_model, plain_model

    mem: dict[str, dict] = {}
    if args.memory:
        base = {"preset": args.preset, "threads": args.threads, "images": args.images, "max_new_tokens": n,
                "root": str(root), "batch_size": args.batch_size}
        for case in ("ask_new", "ask_second", "two_pass", "single_pass", "records_1", "records_b", "records_1_seg", "records_b_seg"):
            mem[case] = spawn_mem({**base, "case": case})

    def m(case: str) -> str:
        if case not in mem:
            return "–"
        return f"{mem[case]['peak_mib']:.0f} (+{mem[case]['rise_mib']:.0f})"

    b = args.batch_size
    k = len(images)
    print(f"{k} images ({', '.join(f'{im.width}×{im.height}' for im, _ in images)}), three questions: short / long "
          f"({len(LONG.split())} words) / a `<region>` box. `[SEG]`: rigged model (answers `[SEG]<|im_end|>`); "
          f"`{n} tok`: plain random model, {n} new tokens. Times: wall-clock medians (CPU-time in brackets); "
          f"ask times are the mean over the three questions of each question's median.\n")
    print("| measurement | time / rate | peak RSS MiB (+ rise) | figure | goal | met |")
    print("|---|---|---|---:|---|---|")
    for tag, a in (("[SEG]", ask_seg), (f"{n} tok", ask_plain)):
        print(f"| ask on a new image: set_image + ask ({tag}), n={a['n_new']} | {a['new_ms']:.1f} ms ({a['new_cpu_ms']:.1f}) | "
              f"{m('ask_new') if tag == '[SEG]' else '–'} | | | |")
        print(f"| later question, same image: ask ({tag}), n={a['n_later']} | {a['second_ms']:.1f} ms ({a['second_cpu_ms']:.1f}) | "
              f"{m('ask_second') if tag == '[SEG]' else '–'} | **{a['ratio']:.2f}×** ({a['cpu_ratio']:.2f}×) faster | "
              f"≥ {GOALS['ask']:.0f}× | {met(a['ratio'], GOALS['ask'])} |")
    print(f"| two-pass reference: HF generate + teacher-forced forward ([SEG]), n={passes['n']} | {passes['two_ms']:.1f} ms "
          f"({passes['two_cpu_ms']:.1f}) | {m('two_pass')} | | | |")
    print(f"| single pass: answer_batch ([SEG]), n={passes['n']} | {passes['single_ms']:.1f} ms ({passes['single_cpu_ms']:.1f}) | "
          f"{m('single_pass')} | **{passes['ratio']:.2f}×** ({passes['cpu_ratio']:.2f}×) faster | "
          f"≥ {GOALS['single_pass']}× | {met(passes['ratio'], GOALS['single_pass'])} |")
    for tag, r, suffix in ((f"{n} tok", rec_plain, ""), ("[SEG]", rec_seg, "_seg")):
        print(f"| predict_records, batch 1 ({tag}; {r['tokens_1']} tokens generated for {len(records)} records) | "
              f"{r['rate_1']:.2f} records/s ({r['cpu_rate_1']:.2f}) | {m('records_1' + suffix)} | | | |")
        print(f"| predict_records, batch {b} ({tag}; {r['tokens_b']} tokens) | {r['rate_b']:.2f} records/s ({r['cpu_rate_b']:.2f}) | "
              f"{m('records_b' + suffix)} | **{r['ratio']:.2f}×** ({r['cpu_ratio']:.2f}×) throughput | "
              f"≥ {GOALS['records']:.0f}× | {met(r['ratio'], GOALS['records'])} |")
    print("\nPer question (short / long / region), new ÷ later: " + "; ".join(
        f"{tag} " + " / ".join(f"{x:.2f}×" for x in a["per_question"]) for tag, a in (("[SEG]", ask_seg), (f"{n} tok", ask_plain))))
    print("Prompt tokens (of which image tokens), min–max over the images: " + "; ".join(
        f"{name} {min(t)}–{max(t)} ({min(i)}–{max(i)})" for name, (t, i) in zip(("short", "long", "region"), lengths)))
    print(f"Passes over the {len(records)} records per batch size: {rec_plain['n']} (alternating, after a warm-up).")

    print("\nOutputs, two-pass reference vs single pass (each of the prompts once):\n")
    for tag, c in (("[SEG]", check_seg), (f"{n} tok", check_plain)):
        iou = "no [SEG]" if c["min_iou"] is None else f"min mask IoU {c['min_iou']:.4f} over {c['segs']} [SEG] (mask pixels {c['mask_pixels']})"
        print(f"- {tag}: same tokens {c['same_tokens']}/{c['prompts']}, same text {c['same_text']}/{c['prompts']}, "
              f"same [SEG] count {c['same_seg_count']}/{c['prompts']}; {iou}")

    print("\nWhere the time goes (exclusive wall ms per ask / answer / record; separate runs with timers):\n")
    print_breakdown(breakdown_cases(args, images, records, root))
    if not args.memory:
        print("\nMemory cases not run (--quick or --no-memory; --memory runs them).")
    print(f"\nPeak RSS: each case in a fresh process, the kernel's peak mark reset after the model and inputs "
          f"are built; (+ rise) is the peak minus the RSS just before the case. Total run {time.perf_counter() - t_start:.0f} s.")
    tmp.cleanup()


if __name__ == "__main__":
    main()
