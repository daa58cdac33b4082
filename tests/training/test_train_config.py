"""Training configs: every shipped YAML parses; bad configs fail before any model is built, naming the key or file."""

from __future__ import annotations

from pathlib import Path

import json
import pytest
import yaml

from fclm.config import ConfigError
from fclm.training.config import (
    STAGE_LOSS_WEIGHTS,
    STAGE_POLICIES,
    load_train_config,
    train_config_from_dict,
    train_config_to_dict,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "train" / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"stage1.yaml", "stage2.yaml", "demo_stage1.yaml", "demo_stage2.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_parses_and_opens_with_its_command(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("fclm-train" in first or "python -m train" in first or "--module train" in first)
    assert path.name in first
    cfg = load_train_config(path, check_files=False)
    assert cfg.stage in (1, 2)
    assert cfg.data.train, "a shipped config names its data"
    if cfg.model is not None and cfg.model.kind == "head_specialist":  # a head alone: no LLM, no regions
        assert cfg.trainability.heads == "full" and cfg.trainability.llm == "full"  # its text encoder
        assert set(cfg.model.heads.enabled) <= {"c3vg", "igvg", "sam"} and cfg.sam_cache.enabled
    elif cfg.stage == 2:
        assert cfg.init_from is not None and cfg.model is None
        assert cfg.trainability.region_extractor == cfg.trainability.projectors == cfg.trainability.sam_decoder == "frozen"
        assert cfg.loss.weights["loss_latent"] > 0
    else:
        assert cfg.model is not None and cfg.trainability.region_extractor == "full"
        assert cfg.loss.weights["loss_self_recon"] > 0
    if cfg.model is None or cfg.model.kind == "fclm":
        assert cfg.trainability.llm == "lora"
    # the parsed config round-trips through plain data (it is saved in every checkpoint)
    again = train_config_from_dict(train_config_to_dict(cfg), check_files=False)
    assert train_config_to_dict(again) == train_config_to_dict(cfg)


def test_demo_configs_pass_the_file_checks_on_real_data(shapes_dir: Path, tmp_path: Path):
    cfg = load_train_config(ROOT / "train/configs/demo_stage1.yaml", [f"data.root={shapes_dir}"])
    assert all(Path(s.path).is_file() for s in cfg.data.train)
    assert cfg.model.sam.img_size == 112 and cfg.model.backbone.text_hidden_size == 128
    export = tmp_path / "export"
    export.mkdir()
    (export / "fclm_config.json").write_text(json.dumps({"config": {"heads": {"enabled": ["sam"]}}, "format_version": 1}))
    cfg2 = load_train_config(ROOT / "train/configs/demo_stage2.yaml", [f"data.root={shapes_dir}", f"init_from={export}"])
    assert cfg2.stage == 2 and Path(cfg2.init_from) == export


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def good(shapes_dir: Path, tmp_path: Path) -> dict:
    return {
        "stage": 1,
        "output_dir": str(tmp_path / "out"),
        "model": {"preset": "tiny"},
        "data": {"train": [{"path": str(shapes_dir / "train_res.jsonl")}]},
    }


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("max_stepz=3", "max_stepz"),
        ("max_steps=three", "max_steps"),
        ("optim.lr=[1]", "optim.lr"),
        ("trainability.llm=partly", "trainability.llm"),
        ("trainability.vision_tower=lora", "trainability.vision_tower"),
        ("trainability.lora.r=0", "lora.r"),
        ("loss.latent_kind=l1", "loss.latent_kind"),
        ("loss.weights.loss_latnt=1.0", "loss_latnt"),
        ("model.backbone.text_layerz=2", "model.backbone.text_layerz"),
        ("model.preset=huge", "huge"),
        ("stage=3", "stage"),
        ("deepspeed=zero9", "zero9"),
        ("checkpoint.resume=/no/such/ckpt", "checkpoint.resume"),
        ("sam_cache.enabled=true", None),  # valid
    ],
)
def test_bad_values_name_the_key(good: dict, tmp_path: Path, override: str, needle: str | None):
    path = _write(tmp_path, good)
    if needle is None:
        load_train_config(path, [override])
        return
    with pytest.raises(ConfigError) as e:
        load_train_config(path, [override])
    assert needle in str(e.value)


def test_missing_data_file_is_named(good: dict, tmp_path: Path):
    good["data"]["train"].append({"path": str(tmp_path / "nope.jsonl"), "weight": 2.0})
    with pytest.raises(ConfigError, match=r"data\.train\[1\]\.path: file not found: .*nope\.jsonl"):
        load_train_config(_write(tmp_path, good))


def test_stage2_needs_a_stage1_export(good: dict, tmp_path: Path):
    stage2 = {k: v for k, v in good.items() if k != "model"} | {"stage": 2}
    with pytest.raises(ConfigError, match="init_from: stage 2 starts from a stage-1 export"):
        load_train_config(_write(tmp_path, stage2))
    (tmp_path / "not_an_export").mkdir()
    with pytest.raises(ConfigError, match=r"init_from: .*not_an_export.*fclm_config\.json not found"):
        load_train_config(_write(tmp_path, stage2 | {"init_from": str(tmp_path / "not_an_export")}))


def test_stage_defaults_and_partial_overrides(good: dict, tmp_path: Path):
    cfg = load_train_config(_write(tmp_path, good), ["loss.weights.loss_ce=0.5", "trainability.heads=frozen", "trainability.lora.r=4"])
    assert cfg.loss.weights == {**STAGE_LOSS_WEIGHTS[1], "loss_ce": 0.5}
    assert cfg.trainability.heads == "frozen" and cfg.trainability.lora.r == 4
    assert cfg.trainability.region_extractor == STAGE_POLICIES[1].region_extractor == "full"
    assert STAGE_POLICIES[1].heads == "full", "the stage preset itself is not modified"


def test_self_recon_from_mask_turns_on_the_mask_projector(good: dict, tmp_path: Path):
    cfg = load_train_config(_write(tmp_path, good), ["loss.self_recon_source=both"])
    if hasattr(cfg.model, "decode_mask_tokens"):
        assert cfg.model.decode_mask_tokens is True
    cfg = load_train_config(_write(tmp_path, good))
    if hasattr(cfg.model, "decode_mask_tokens"):
        assert cfg.model.decode_mask_tokens is False


def test_bad_config_fails_before_any_model_is_built(good: dict, tmp_path: Path, monkeypatch, capsys):
    import fclm.model
    import fclm.training.loop as loop
    from train.__main__ import main

    built = []
    monkeypatch.setattr(fclm.model, "build_fclm", lambda *a, **k: built.append(1))
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: built.append(1))
    path = _write(tmp_path, good)
    assert main([str(path), "optim.warmup=3"]) == 2
    assert "optim.warmup" in capsys.readouterr().err
    assert main([str(path), f"data.train=[{{path: {tmp_path / 'gone.jsonl'}}}]"]) == 2
    assert "gone.jsonl" in capsys.readouterr().err
    assert built == []


def test_loss_weights_follow_the_routed_heads(good: dict, tmp_path: Path):
    path = _write(tmp_path, good)
    # a head's term is known only when the model routes to that head
    with pytest.raises(ConfigError, match=r"loss\.weights\.loss_c3vg_box_l1: neither the model nor a routed head \(heads\.enabled: sam\)"):
        load_train_config(path, ["loss.weights.loss_c3vg_box_l1=2.0"])
    cfg = load_train_config(path, ["model.heads.enabled=[sam, c3vg]", "loss.weights.loss_c3vg_box_l1=2.0"])
    assert cfg.loss.weights["loss_c3vg_box_l1"] == 2.0 and cfg.loss.weights["loss_mask_bce"] == STAGE_LOSS_WEIGHTS[1]["loss_mask_bce"]
    # without the sam head, the stage defaults of its terms are left out (not reported as unknown)
    cfg = load_train_config(path, ["model.heads.enabled=[c3vg]", "model.heads.default=c3vg"])
    assert "loss_mask_bce" not in cfg.loss.weights and cfg.loss.weights["loss_ce"] == 1.0
    with pytest.raises(ConfigError, match="loss_mask_bce"):
        load_train_config(path, ["model.heads.enabled=[c3vg]", "model.heads.default=c3vg", "loss.weights.loss_mask_bce=1.0"])
    with pytest.raises(ConfigError, match="unknown head 'c4vg'"):
        load_train_config(path, ["model.heads.enabled=[sam, c4vg]"])


def test_numbers_in_exponent_notation_are_numbers(good: dict, tmp_path: Path):
    # PyYAML (YAML 1.1) reads "3e-4" and "1.0e3" as strings; a float field takes them as the numbers they are.
    good["optim"] = {**good.get("optim", {}), "lr": "2e-4"}
    cfg = load_train_config(_write(tmp_path, good), ["optim.weight_decay=1.0e-1", "optim.eps=1E-8"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps) == (2e-4, 0.1, 1e-8)
    assert type(cfg.optim.lr) is float
    for bad in ("optim.lr=1e", "optim.lr=e-3", "optim.lr=fast", "max_steps=1e3"):  # an int field stays an int
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_train_config(_write(tmp_path, good), [bad])
