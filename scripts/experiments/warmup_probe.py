"""Probe: held-out ``<pos>`` reconstruction right after the demo's reconstruction warm-up, per warm-up setting.

    python scripts/experiments/warmup_probe.py --name shipped [--out runs/demo] [OVERRIDE ...]
    python scripts/experiments/warmup_probe.py --name steps4000 recon_warmup.steps=4000

Starts where the demo's warm-up starts — the export of stage 1's RES-only phase
(``OUT/stage1_ground/export``, written by ``bash scripts/demo.sh``) — and runs
:func:`fclm.training.warmup.reconstruction_warmup` with ``train/configs/demo_stage1.yaml``'s settings
(seed 0, SAM embeddings through ``OUT/sam_cache``) and the ``fclm-train``-style overrides given, then scores
the demo's figure, :func:`fclm.training.probes.pos_reconstruction_iou` (mean over regions) on the first 150
``val_dlres`` records, and the pooled-mask baseline on the same regions. No main steps follow: the figure is
the warm-up's alone (the demo's ``pos_recon_iou`` is measured after the mixture that follows it).
One line of JSON per run is printed and appended to ``OUT/warmup_probe.jsonl``. One torch thread.

``--prompt-tokens K`` (a probe of the decoder's capacity, not a model option): the pos projector's output
goes through one more linear layer to K prompt tokens for the SAM decoder instead of one, so the same
``<pos>`` is decoded from K tokens (the layer is trained with the warm-up).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def widen_pos_prompt(model: torch.nn.Module, k: int) -> None:
    """Decode ``<pos>`` from ``k`` SAM prompt tokens: pos projector → Linear(C, k·C) → (R, k, C). For this
    probe only: ``z_pos`` is then k·C wide, so the latent loss and cosine are not meaningful on the model."""
    c = model.sam.prompt_encoder.embed_dim
    model.pos_projector = torch.nn.Sequential(model.pos_projector, torch.nn.Linear(c, k * c))
    decode = model.sam.decode

    def decode_pos(embeddings: torch.Tensor, sparse: torch.Tensor):  # [SEG] prompts (C wide) pass unchanged
        return decode(embeddings, sparse.reshape(sparse.shape[0], k, c) if sparse.shape[-1] == k * c else sparse)

    model.sam.decode = decode_pos


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--name", required=True, help="the run's name in the results file")
    ap.add_argument("--limit", type=int, default=150, help="held-out val_dlres records scored (the demo's 150)")
    ap.add_argument("--prompt-tokens", type=int, default=1, help="decode <pos> from this many SAM prompt tokens")
    ap.add_argument("overrides", nargs="*", help="demo_stage1.yaml overrides, e.g. recon_warmup.steps=4000")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from fclm.training.building import build_model
    from fclm.training.config import load_train_config
    from fclm.training.loop import _recon_warmup, build_criterion
    from fclm.training.probes import pos_reconstruction_iou
    from fclm.training.sam_cache import encoder_fingerprint
    from fclm.training.trainability import apply_trainability

    out, data = args.out, args.out / "shapesref"
    start = out / "stage1_ground" / "export"
    if not start.is_dir():
        raise SystemExit(f"{start} not found: run bash scripts/demo.sh first (or pass --out)")
    cfg = load_train_config(ROOT / "train" / "configs" / "demo_stage1.yaml", [
        f"data.root={data}", f"sam_cache.dir={out / 'sam_cache'}", "model=null", f"init_from={start}",
        "cpu_threads=1", "seed=0", f"output_dir={out / 'warmup_probe' / args.name}", *args.overrides])
    set_seed(cfg.seed)
    model = build_model(cfg)
    apply_trainability(model, cfg.trainability)
    criterion = build_criterion(cfg.loss, model.config)
    if args.prompt_tokens > 1:
        widen_pos_prompt(model, args.prompt_tokens)
    with open(data / "val_dlres.jsonl") as f:
        val = [json.loads(line) for line in f if line.strip()][: args.limit]
    val = [{**r, "image": str(data / r["image"])} for r in val]
    t0 = time.perf_counter()
    _recon_warmup(cfg, Accelerator(cpu=True), model, criterion, encoder_fingerprint(model.sam.image_encoder))
    seconds = time.perf_counter() - t0
    recon = pos_reconstruction_iou(model, val, batch_size=16)
    result = {"name": args.name, "overrides": args.overrides, "prompt_tokens": args.prompt_tokens,
              "pos_recon_iou": recon["pos_recon_miou"], "pos_recon_iou_pooled": recon["pos_recon_miou_pooled"], "regions": recon["regions"],
              "warmup_seconds": round(seconds, 1)}
    print(json.dumps(result), flush=True)
    with open(out / "warmup_probe.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
