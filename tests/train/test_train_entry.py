"""The real entry point (`python -m train` = `train.__main__.main`) on the tiny model and ShapesRef batches:
files, log lines, trainable-parameter count, kill + resume = uninterrupted, NaN guard, export → from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from train.__main__ import main

STEPS = 6


def write_config(tmp: Path, shapes: Path, name: str, **extra) -> Path:
    cfg = {
        "stage": 1,
        "output_dir": str(tmp / name),
        "model": {"preset": "tiny"},
        "data": {
            "root": str(shapes),
            "train": [
                {"path": "train_res.jsonl", "weight": 1.0},
                {"path": "train_region_caption.jsonl", "weight": 1.0},
                {"path": "train_dlres.jsonl", "weight": 0.5},
            ],
            "batch_size": 4,
        },
        "optim": {"lr": 1.0e-3, "warmup_steps": 2},
        "max_steps": STEPS,
        "checkpoint": {"every": 2, "keep_last": 2},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": True},
        "sam_cache": {"dir": str(tmp / f"{name}_cache")},
        "cpu_threads": 1,
    }
    for key, value in extra.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(output_dir: Path) -> dict[int, dict[str, float]]:
    from fclm.training.tracking import read_metrics

    return read_metrics(output_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def run_a(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of STEPS steps (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("run_a")
    torch.set_num_threads(1)
    assert main([str(write_config(tmp, shapes_dir, "a"))]) == 0
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return tmp / "a"


def _expected_trainable(model) -> int:
    """Stage-1 count from module shapes: LoRA r·(in+out) on the LLM's 7 projections, 3 new rows × 2 matrices,
    extractor + projectors + SAM prompt encoder and mask decoder in full."""
    import torch.nn as nn

    lm = model.backbone.model.language_model
    n = sum(16 * (m.in_features + m.out_features) for name, m in lm.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    n += 3 * lm.embed_tokens.embedding_dim + 3 * model.backbone.lm_head.in_features
    parts = [model.region_extractor, model.seg_projector, model.pos_projector, model.sam.prompt_encoder, model.sam.mask_decoder]
    return n + sum({id(p): p.numel() for m in parts for p in m.parameters()}.values())


def test_entry_point_writes_checkpoints_logs_and_counts(run_a: Path):
    from fclm.config import preset
    from fclm.model import build_fclm

    ckpts = sorted(p.name for p in (run_a / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000004", "step-00000006"]
    files = {p.name for p in (run_a / "checkpoints" / "step-00000006").iterdir()}
    assert files == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json"}
    state = json.loads((run_a / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["sampler"]["position"] == STEPS and state["config"]["stage"] == 1
    result = json.loads((run_a / "train_result.json").read_text())
    expected = _expected_trainable(build_fclm(preset("tiny")))
    assert result["trainable_parameters"] == expected
    assert result["steps"] == STEPS and result["skipped_steps"] == 0
    assert result["sam_cache_misses"] > 0 and result["export_dir"] == str(run_a / "export")
    log = (run_a / "train.log").read_text()
    assert f"trainable parameters: {expected:,}" in log
    for step in (1, STEPS):
        line = next(l for l in log.splitlines() if f"step {step}/{STEPS} " in l)
        for name in ("loss_ce", "loss_mask_bce", "loss_mask_dice", "loss_self_recon", "loss_latent", "total", "lr", "samples/s", "tokens/s"):
            assert name in line, (name, line)
    rows = losses(run_a)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows[1]["lr"] == pytest.approx(5e-4) and rows[2]["lr"] == pytest.approx(1e-3)  # warm-up of 2 steps
    assert list((run_a / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_a / "export" / "fclm_config.json").is_file()


def test_killed_and_resumed_run_repeats_the_same_losses(run_a: Path, shapes_dir: Path, tmp_path: Path, monkeypatch):
    from fclm.training.tracking import RunTracker

    real = RunTracker.log_step

    def crash_at_5(self, step, scalars, **kw):
        if step == 5:
            raise KeyboardInterrupt("killed after the update of step 5, before its checkpoint")
        return real(self, step, scalars, **kw)

    cfg = write_config(tmp_path, shapes_dir, "b")
    monkeypatch.setattr(RunTracker, "log_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        main([str(cfg)])
    monkeypatch.setattr(RunTracker, "log_step", real)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert main([str(cfg)]) == 0  # resume=auto
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()
    a, b = losses(run_a), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for name in ("loss_ce", "loss_mask_bce", "loss_mask_dice", "loss_self_recon", "loss_latent", "total", "lr"):
            assert b[step][name] == pytest.approx(a[step][name], rel=1e-5, abs=1e-6), (step, name)


def test_export_loads_with_from_pretrained_and_gives_identical_outputs(run_a: Path, shapes_dir: Path, tmp_path: Path):
    from fclm.data import JsonlDataset
    from fclm.data.collator import FCLMCollator
    from fclm.model import FCLM
    from fclm.training.export import load_model_from_checkpoint
    from fclm.training.trainability import merge_adapters

    out = tmp_path / "exported"
    assert main(["export", str(run_a), "--out", str(out)]) == 0
    loaded = FCLM.from_pretrained(out).eval()
    trained = load_model_from_checkpoint(run_a / "checkpoints" / "step-00000006").eval()
    records = [JsonlDataset(shapes_dir / f"train_{t}.jsonl")[0] for t in ("res", "region_caption", "dlres")]
    batch = FCLMCollator(loaded.processor)(records)
    with torch.no_grad():
        unmerged = trained(dict(batch))
        merge_adapters(trained)
        merged = trained(dict(batch))
        got = loaded(dict(batch))
    for key in ("logits", "seg_embeddings", "pos_embeddings", "pred_recon_masks"):
        assert torch.equal(got[key], merged[key]), key
        assert torch.allclose(got[key], unmerged[key], atol=1e-4, rtol=1e-4), key
    # training changed what it trains and nothing it freezes
    from fclm.config import preset
    from fclm.model import build_fclm
    from accelerate.utils import set_seed

    set_seed(0)
    fresh = build_fclm(preset("tiny"))
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert same(loaded.sam.image_encoder, fresh.sam.image_encoder)
    assert same(loaded.qwen.model.visual, fresh.qwen.model.visual)
    assert not same(loaded.region_extractor, fresh.region_extractor)
    assert not same(loaded.qwen.model.language_model, fresh.qwen.model.language_model)  # LoRA merged in
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_nan_guard_skips_counts_and_stops(shapes_dir: Path, tmp_path: Path, monkeypatch):
    from fclm.losses import FCLMCriterion
    from fclm.training.loop import NonFiniteLossError

    real = FCLMCriterion.__call__
    calls = {"n": 0}

    def sometimes_nan(self, outputs, batch):
        calls["n"] += 1
        out = real(self, outputs, batch)
        if calls["n"] in (2, 3):
            out["loss_ce"] = out["loss_ce"] * float("nan")
        return out

    monkeypatch.setattr(FCLMCriterion, "__call__", sometimes_nan)
    cfg = write_config(tmp_path, shapes_dir, "nan", max_steps=3, export_at_end=False, logging__tensorboard=False)
    assert main([str(cfg)]) == 0
    result = json.loads((tmp_path / "nan" / "train_result.json").read_text())
    assert result["skipped_steps"] == 2 and result["steps"] == 3 and calls["n"] == 5
    events = [json.loads(l) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [e["skipped_nonfinite"] for e in events if "skipped_nonfinite" in e] == [1, 2]
    rows = losses(tmp_path / "nan")
    assert all(r["total"] == r["total"] for r in rows.values())  # no NaN reached a logged step
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    calls["n"] = 0
    cfg = write_config(tmp_path, shapes_dir, "nan2", max_steps=3, export_at_end=False, max_skipped_steps=1, logging__tensorboard=False)
    with pytest.raises(NonFiniteLossError, match="2 steps had a non-finite loss"):
        main([str(cfg)])


def test_cache_sam_fills_the_cache_the_run_then_only_reads(shapes_dir: Path, tmp_path: Path):
    cfg = write_config(tmp_path, shapes_dir, "c", max_steps=2, export_at_end=False, logging__tensorboard=False)
    assert main(["cache-sam", str(cfg)]) == 0
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    folders = [p for p in (tmp_path / "c_cache").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "data.bin").stat().st_size > 0
    assert main([str(cfg)]) == 0
    result = json.loads((tmp_path / "c" / "train_result.json").read_text())
    assert result["sam_cache_misses"] == 0 and result["sam_cache_hits"] > 0
