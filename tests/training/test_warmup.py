"""The self-reconstruction warm-up: it trains only the position branch, the pos projector and the SAM
decoder, lowers the reconstruction loss, and a run with it skips it when resuming."""

from __future__ import annotations

import copy

import pytest
import torch

from data_builders.__main__ import main as data_main
from fclm.config import preset
from fclm.losses import FCLMCriterion
from fclm.training.config import train_config_from_dict
from fclm.training.trainability import apply_trainability
from fclm.training.warmup import collect_regions, reconstruction_warmup, warmup_lr_lambda


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapesref")
    assert data_main(["synthetic", "--n", "12", "--n-val", "2", "--seed", "1", "--out", str(out)]) == 0
    return out


def _cfg(shapes, **warmup):
    return train_config_from_dict({
        "stage": 1, "model": {"preset": "tiny"}, "output_dir": str(shapes / "run"),
        "data": {"root": str(shapes), "train": [{"path": "train_res.jsonl"}, {"path": "train_roc.jsonl"}]},
        "recon_warmup": {"steps": 30, "batch_size": 8, "lr": 3e-3, "max_regions": 24, **warmup},
        "logging": {"every": 1},
    })


def test_warmup_trains_the_position_path_only_and_lowers_the_loss(shapes):
    from fclm.model import build_fclm

    cfg = _cfg(shapes)
    torch.manual_seed(0)
    model = build_fclm(cfg.model)
    apply_trainability(model, cfg.trainability)
    before = copy.deepcopy(model.state_dict())
    encode = lambda batch: model.sam.encode(batch["sam_images"])  # noqa: E731
    regions = collect_regions(model, [r for r in _records(shapes)][:5], encode=encode)
    assert regions["features"].shape[0] == regions["masks"].shape[0] == regions["embeddings"].shape[0] == 5
    first = reconstruction_warmup(model, _cfg(shapes, steps=1), encode=encode, criterion=FCLMCriterion(cfg.loss))
    result = reconstruction_warmup(model, cfg, encode=encode, criterion=FCLMCriterion(cfg.loss))
    assert result["regions"] == 24 and result["steps"] == 30
    assert result["loss_self_recon"] < first["loss_self_recon"]
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"region_extractor.pos_mlp", "pos_projector.layers", "sam.prompt_encoder", "sam.mask_decoder"}


@pytest.mark.parametrize("fused", [True, False])
def test_warmup_optimizer_follows_optim_fused(shapes, monkeypatch, fused):
    from fclm.model import build_fclm

    seen = []
    real = torch.optim.AdamW

    class Spy(real):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("fused"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    cfg = train_config_from_dict({
        "stage": 1, "model": {"preset": "tiny"}, "output_dir": str(shapes / "run"),
        "data": {"root": str(shapes), "train": [{"path": "train_roc.jsonl"}]},
        "recon_warmup": {"steps": 1, "batch_size": 4, "max_regions": 4}, "optim": {"fused": fused}})
    model = build_fclm(cfg.model)
    apply_trainability(model, cfg.trainability)
    reconstruction_warmup(model, cfg, encode=lambda b: model.sam.encode(b["sam_images"]), criterion=FCLMCriterion(cfg.loss))
    assert seen == [True if fused else None]  # off: torch's own choice, as build_optimizer


def _records(shapes):
    import json

    with open(shapes / "train_roc.jsonl") as f:
        return [{**r, "image": str(shapes / r["image"])} for r in map(json.loads, f)]


def test_warmup_config_is_checked(shapes):
    from fclm.config import ConfigError

    with pytest.raises(ConfigError, match="recon_warmup"):
        _cfg(shapes, steps=-1)
    with pytest.raises(ConfigError, match="recon_warmup.schedule"):
        _cfg(shapes, schedule="linear")
    assert preset("tiny").region_extractor.pos_layers >= 1


def test_warmup_files_give_regions_to_a_run_whose_own_data_has_none(shapes):
    from fclm.config import ConfigError
    from fclm.training.warmup import _records_with_regions

    res_only = {"root": str(shapes), "train": [{"path": "train_res.jsonl"}]}
    base = {"stage": 1, "model": {"preset": "tiny"}, "output_dir": str(shapes / "run"), "data": res_only}
    cfg = train_config_from_dict({**base, "recon_warmup": {"steps": 2, "max_regions": 6}})
    assert _records_with_regions(cfg, 6) == []  # RES records carry no regions
    cfg = train_config_from_dict({**base, "recon_warmup": {"steps": 2, "max_regions": 6, "files": ["train_roc.jsonl"]}})
    assert cfg.recon_warmup.files == [str(shapes / "train_roc.jsonl")]  # resolved against data.root
    records = _records_with_regions(cfg, 6)
    assert records and all(r["regions"] for r in records) and sum(len(r["regions"]) for r in records) >= 6
    with pytest.raises(ConfigError, match=r"recon_warmup.files\[0\]: file not found"):
        train_config_from_dict({**base, "recon_warmup": {"files": ["missing.jsonl"]}})


def test_warmup_lr_ramps_then_stays_or_decays_by_a_half_cosine():
    import math

    constant, cosine = warmup_lr_lambda(200, "constant"), warmup_lr_lambda(200, "cosine")
    ramp = 10  # 5 % of 200
    for s in range(ramp - 1):
        assert constant(s) == cosine(s) == pytest.approx((s + 1) / ramp)
    assert [constant(s) for s in (ramp - 1, 100, 199)] == [1.0, 1.0, 1.0]
    # from 1 at the ramp's end, falling at every step, small but positive at the last step
    assert cosine(ramp - 1) == pytest.approx(1.0)
    for s in range(ramp, 200):
        assert 0 < cosine(s) < cosine(s - 1)
    assert cosine(199) < 1e-3
    # a half cosine is point-symmetric about its middle: steps as far after it as others are before sum to 1
    for s in range(ramp, 200):
        mirror = 2 * ramp - 2 + (200 - ramp + 1) - s
        if ramp <= mirror < 200:
            assert cosine(s) + cosine(mirror) == pytest.approx(1.0)
    assert cosine(104) == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 95 / 191))
