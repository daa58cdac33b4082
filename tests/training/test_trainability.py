"""apply_trainability: the count it returns equals one computed from the module shapes, per policy."""

from __future__ import annotations

import copy

import pytest
import torch.nn as nn

from fclm.config import preset
from fclm.training.config import STAGE_POLICIES, LoraOptions, TrainabilityPolicy
from fclm.training.trainability import apply_trainability, merge_adapters, new_token_ids


@pytest.fixture(scope="module")
def base_model():
    from fclm.model import build_fclm

    return build_fclm(preset("tiny"))


def _unique_numel(*modules: nn.Module | None) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        if m is not None:
            for p in m.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


def _expected(model, policy: TrainabilityPolicy) -> int:
    """Trainable parameters implied by a policy, computed from the un-adapted model's module shapes."""
    qwen = model.backbone
    lm = qwen.model.language_model
    n = 0
    if policy.llm == "full":
        n += _unique_numel(lm, qwen.lm_head)
    if policy.llm == "lora":
        for name, mod in lm.named_modules():
            if isinstance(mod, nn.Linear) and name.split(".")[-1] in policy.lora.target_modules:
                n += policy.lora.r * (mod.in_features + mod.out_features)
    head_full = policy.llm == "lora" and policy.lm_head == "full"
    embed_full = policy.llm == "lora" and policy.embed_tokens == "full"
    if head_full:
        n += qwen.lm_head.weight.numel()
    if embed_full:
        n += lm.embed_tokens.weight.numel()
    if policy.new_token_rows and policy.llm != "full":
        rows = len({model.token_ids[k] for k in ("mask", "pos", "seg")})
        if not embed_full:
            n += rows * lm.embed_tokens.embedding_dim  # input embedding rows
        if not head_full:
            n += rows * qwen.lm_head.in_features  # lm_head rows (untied in FCLM's tiny backbone)
    sam = model.sam
    if policy.sam_decoder == "full":
        n += _unique_numel(sam.prompt_encoder, sam.mask_decoder)
    if policy.sam_image_encoder == "full":
        n += _unique_numel(sam.image_encoder)
    if policy.vision_tower == "full":
        n += _unique_numel(qwen.model.visual)
    if policy.region_extractor == "full":
        n += _unique_numel(model.region_extractor)
    if policy.projectors == "full":
        n += _unique_numel(model.seg_projector, model.pos_projector, model.mask_projector)
    if policy.heads == "full":
        shared = {id(p) for p in sam.parameters()}
        n += sum(p.numel() for p in {id(p): p for p in model.heads.parameters()}.values() if id(p) not in shared)
    return n


POLICIES = {
    "stage1": STAGE_POLICIES[1],
    "stage2": STAGE_POLICIES[2],
    "llm_full": TrainabilityPolicy(llm="full", vision_tower="full"),
    "rows_only": TrainabilityPolicy(llm="frozen", region_extractor="frozen", projectors="frozen", sam_decoder="frozen", heads="frozen"),
    "lora_lm_head_full": TrainabilityPolicy(lm_head="full"),
    "lora_embed_full": TrainabilityPolicy(embed_tokens="full"),
    "lora_embed_and_lm_head_full": TrainabilityPolicy(embed_tokens="full", lm_head="full"),
    "lora_no_rows_r4": TrainabilityPolicy(new_token_rows=False, lora=LoraOptions(r=4, target_modules=("q_proj", "v_proj"))),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_count_matches_module_shapes(base_model, name: str, caplog):
    policy = POLICIES[name]
    expected = _expected(base_model, policy)
    model = copy.deepcopy(base_model)
    with caplog.at_level("INFO", logger="fclm.training.trainability"):
        n = apply_trainability(model, policy)
    assert n == expected > 0
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable parameters: {n:,}" in caplog.text
    # encoders frozen unless asked
    if policy.sam_image_encoder == "frozen":
        assert not any(p.requires_grad for p in model.sam.image_encoder.parameters())
    if policy.vision_tower == "frozen":
        assert not any(p.requires_grad for p in model.qwen.model.visual.parameters())
    # LoRA only on the language model (vision blocks also have gate/up/down_proj)
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert all(".language_model." in n for n in lora)
    assert bool(lora) == (policy.llm == "lora")


def test_stage2_freezes_what_stage1_trained(base_model):
    model = copy.deepcopy(base_model)
    apply_trainability(model, STAGE_POLICIES[2])
    for part in (model.region_extractor, model.seg_projector, model.pos_projector, model.sam.mask_decoder, model.sam.prompt_encoder):
        assert not any(p.requires_grad for p in part.parameters())
    rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert rows and all(p.requires_grad and p.shape[0] == len(new_token_ids(model)) for p in rows)


def test_running_statistics_follow_the_projectors_mode(base_model):
    """The seg projector's FeatureStandardize (``seg_query_norm: standardize``) updates its statistics only
    where projectors train."""
    from fclm.model import build_fclm

    cfg = preset("tiny")
    cfg.seg_query_norm = "standardize"
    model = build_fclm(cfg)
    norm = model.seg_projector.norm
    assert norm is not None
    apply_trainability(model, STAGE_POLICIES[2])
    assert norm.update_stats is False
    apply_trainability(model, STAGE_POLICIES[1])
    assert norm.update_stats is True
    from fclm.training.trainability import stateful_buffer_names, trainable_state_dict

    names = stateful_buffer_names(model)
    assert names == ["seg_projector.norm.running_mean", "seg_projector.norm.running_var", "seg_projector.norm.num_batches"]
    assert set(names) <= set(trainable_state_dict(model))


def test_reapplying_a_policy_is_idempotent_and_merge_restores_plain_backbone(base_model):
    model = copy.deepcopy(base_model)
    n1 = apply_trainability(model, STAGE_POLICIES[1])
    n2 = apply_trainability(model, STAGE_POLICIES[1])
    assert n1 == n2
    merge_adapters(model)
    assert model.backbone is model.qwen
    assert not any("lora_" in n or "trainable_tokens" in n for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base_model.parameters())


def test_optim_lr_scale_gives_a_part_its_own_learning_rate(base_model):
    from fclm.training.config import OptimConfig, TrainConfig
    from fclm.training.loop import build_optimizer

    model = copy.deepcopy(base_model)
    apply_trainability(model, TrainabilityPolicy(llm="lora", vision_tower="full"))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    visual = {id(p) for p in model.qwen.model.visual.parameters()} & trainable
    cfg = TrainConfig(optim=OptimConfig(lr=1e-3, lr_scale={"vision_tower": 0.1}, weight_decay=0.01))
    optimizer, scheduler = build_optimizer(cfg, model, None)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert set(lr_of) == trainable and visual  # every trainable parameter once, the tower among them
    assert all(lr_of[i] == pytest.approx(1e-4) for i in visual)
    assert all(lr_of[i] == pytest.approx(1e-3) for i in trainable - visual)
    for _ in range(3):  # the schedule keeps the ratio: it multiplies each group's own lr
        optimizer.step()
        scheduler.step()
    lrs = {round(g["lr"] / optimizer.param_groups[0]["lr"], 6) for g in optimizer.param_groups}
    assert lrs == {1.0, 0.1} and optimizer.param_groups[0]["lr"] < 1e-3  # cosine: below the peak by now
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.qwen.model.visual.named_parameters():  # biases and norms still skip weight decay
        assert decay_of[id(p)] == (0.0 if p.ndim < 2 else 0.01), name
    # without lr_scale: the two groups of before, in their order (decay, then no decay), all at lr
    plain, _ = build_optimizer(TrainConfig(optim=OptimConfig(lr=1e-3, weight_decay=0.01)), model, None)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.01, 0.0] and all(g["lr"] == 1e-3 for g in plain.param_groups)
    with pytest.raises(ValueError, match="unknown parts"):
        build_optimizer(TrainConfig(optim=OptimConfig(lr_scale={"vision": 0.1})), model, None)
    with pytest.raises(ValueError, match="must be > 0"):
        OptimConfig(lr_scale={"llm": 0.0})
