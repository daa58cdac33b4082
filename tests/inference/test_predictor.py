"""FCLMPredictor: image once / ask many, the single pass against teacher forcing and transformers' generate,
region prompts of every kind, errors naming the region, streaming, chat history, sampling, bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fclm.inference import FCLMPredictor, SamplingConfig
from fclm.inference.decoding import decode, run
from fclm.inference.predictor import _phrase
from fclm.inference.regions import sample_polyline
from fclm.masks import decode_rle, encode_mask


def _answers_equal(a, b) -> None:
    assert a.text == b.text
    assert len(a.segments) == len(b.segments)
    for sa, sb in zip(a.segments, b.segments):
        assert sa.phrase == sb.phrase and len(sa.instances) == len(sb.instances)
        for ia, ib in zip(sa.instances, sb.instances):
            assert np.array_equal(ia.mask, ib.mask) and ia.box == ib.box and ia.score == ib.score
    for ra, rb in zip(a.regions, b.regions):
        assert np.array_equal(ra.mask, rb.mask)


def test_second_question_on_a_cached_image_is_bit_identical_to_a_fresh_ask(seg_model, image):
    p = FCLMPredictor(seg_model)
    p.set_image(image)
    p.ask("Please segment the blue square.")
    cached = p.ask("What is <region>? Segment it.", regions=[{"box": [5, 5, 30, 25]}])
    fresh = FCLMPredictor(seg_model).ask("What is <region>? Segment it.", regions=[{"box": [5, 5, 30, 25]}], image=image)
    _answers_equal(cached, fresh)
    assert cached.text == "[SEG]" and cached.segments[0].instances  # the rigged model grounds


def test_single_pass_seg_state_equals_the_teacher_forced_reference(seg_model, image):
    proc = seg_model.processor
    m = np.zeros((40, 50), bool)
    m[5:20, 10:30] = True
    question = "Please segment the <region> thing."
    p = FCLMPredictor(seg_model)
    answer = p.ask(question, regions=[m], image=image)
    assert answer.text == "[SEG]"

    # the same prompt, decoded by the generation loop: h[SEG] from the step that fed [SEG]
    prompt = proc.collate([proc.encode_record({"id": "q", "messages": [{"role": "user", "content": question}],
                                               "regions": [{"mask": encode_mask(m)}]}, image, add_generation_prompt=True)],
                          padding_side="left")
    with torch.no_grad():
        pre = seg_model.embed_inputs(prompt)
        ids = seg_model.token_ids
        gen = run(decode(seg_model.qwen, input_ids=prompt["input_ids"], inputs_embeds=pre["inputs_embeds"],
                         attention_mask=prompt["attention_mask"], image_grid_thw=prompt["image_grid_thw"],
                         mm_token_type_ids=prompt["mm_token_type_ids"], seg_id=ids["seg"],
                         stop_ids={ids["im_end"]}, pad_id=ids["pad"]))
        # the reference: one teacher-forced forward over prompt + answer, as in training
        full = proc.collate([proc.encode_record({
            "id": "q", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "[SEG]"}],
            "regions": [{"mask": encode_mask(m)}], "targets": [{"masks": [encode_mask(m)]}]}, image)])
        out = seg_model(full)
    torch.testing.assert_close(gen.seg_hidden[0], out["seg_hidden"], rtol=1e-4, atol=1e-4)
    head = out["heads"]["sam"]
    logits = seg_model.sam.postprocess_masks(head["pred_masks"], full["sam_valid_hw"][0], full["original_hw"][0])
    ref = (logits[0] > 0).numpy()
    got = answer.segments[0].instances[0].mask
    assert got.shape == (40, 50)
    assert (got != ref).mean() < 1e-3  # equal up to a pixel whose logit sits at 0 ± float noise
    assert answer.segments[0].instances[0].score == pytest.approx(float(head["pred_scores"][0]), abs=1e-4)


class ForceTokens:
    """A transformers-style logits processor that makes greedy decoding emit ``tokens`` in order."""

    def __init__(self, tokens: list[int], prompt_len: int) -> None:
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -1e9)
        forced[:, self.tokens[min(step, len(self.tokens) - 1)]] = 0.0
        return forced


def test_several_seg_states_mid_answer_equal_teacher_forcing_on_an_unrigged_model(tiny_model, image):
    """An answer with words around two [SEG]s, forced on the plain random model: each [SEG]'s state and mask
    from the single pass equals the teacher-forced forward over the same prompt + answer."""
    proc = tiny_model.processor
    ids = tiny_model.token_ids
    answer_text = "the box [SEG] and the circle [SEG]."
    pieces = answer_text.split("[SEG]")
    forced = proc._text(pieces[0]) + [ids["seg"]] + proc._text(pieces[1]) + [ids["seg"]] + proc._text(pieces[2]) + [ids["im_end"]]
    record = {"id": "q", "messages": [{"role": "user", "content": "Find the box and the circle."}]}
    prompt = proc.collate([proc.encode_record(record, image, add_generation_prompt=True)], padding_side="left")
    p = FCLMPredictor(tiny_model)
    answer = p.ask("Find the box and the circle.", image=image, logits_processor=[ForceTokens(forced, prompt["input_ids"].shape[1])])
    assert answer.text == answer_text and answer.finish_reason == "stop"
    assert [s.phrase for s in answer.segments] == ["the box", "and the circle"]
    full = proc.collate([proc.encode_record({**record, "messages": record["messages"] + [{"role": "assistant", "content": answer_text}],
                                             "targets": [{"masks": []}, {"masks": []}]}, image)])
    with torch.no_grad():
        out = tiny_model(full)
    head = out["heads"]["sam"]
    logits = tiny_model.sam.postprocess_masks(head["pred_masks"], full["sam_valid_hw"][0], full["original_hw"][0])
    assert bool((logits > 0).any()) and bool((logits < 0).any())  # a comparison of real masks, not of two empty ones
    for k, seg in enumerate(answer.segments):
        ref = (logits[k] > 0).numpy()
        got = seg.union(40, 50)
        assert (got != ref).mean() < 1e-3
        if seg.instances:
            assert seg.instances[0].score == pytest.approx(float(head["pred_scores"][k]), abs=1e-4)


def test_greedy_answers_equal_transformers_generate(tiny_model, image):
    p = FCLMPredictor(tiny_model)
    p.set_image(image)
    for q in ("Describe the picture.", "What colour is <region>?"):
        regions = [{"box": [2, 3, 40, 30]}] if "<region>" in q else []
        answer = p.ask(q, regions, max_new_tokens=12)
        batch = tiny_model.processor.prompt_for_generation(image, q, regions=[r.mask for r in answer.regions])
        ref = tiny_model.generate(batch, max_new_tokens=12)[0].tolist()
        stop = ref.index(tiny_model.token_ids["im_end"]) if tiny_model.token_ids["im_end"] in ref else len(ref)
        assert answer.text == tiny_model.processor.tokenizer.decode(ref[:stop], skip_special_tokens=False)
        assert answer.finish_reason == ("stop" if stop < len(ref) else "length")
        assert answer.completion_tokens == min(len(ref), stop + 1)


def test_box_prompt_and_the_equivalent_mask_take_the_same_region_path(seg_model, image):
    seen = []
    hook = seg_model.region_extractor.register_forward_hook(lambda mod, args, kwargs_out: seen.append(kwargs_out))
    try:
        p = FCLMPredictor(seg_model)
        p.set_image(image)
        by_box = p.ask("Segment <region>.", regions=[{"box": [10, 5, 30, 20]}])
        region = by_box.regions[0]
        assert region.kind == "box" and region.source in ("sam", "fallback") and region.mask.shape == (40, 50)
        by_mask = p.ask("Segment <region>.", regions=[region.mask])
    finally:
        hook.remove()
    (mask_a, pos_a), (mask_b, pos_b) = seen
    assert torch.equal(mask_a, mask_b) and torch.equal(pos_a, pos_b)
    _answers_equal(by_box, by_mask)


def test_points_and_scribbles_become_masks(seg_model, image):
    p = FCLMPredictor(seg_model)
    p.set_image(image)
    clicks = p.region_masks([{"points": [[12, 10], [40, 30]], "labels": [1, 0]}, {"scribble": [[5, 5], [20, 10], [30, 30]]}])
    for r, kind in zip(clicks, ("points", "scribble")):
        assert r.kind == kind and r.mask.shape == (40, 50) and r.mask.any()
        assert (r.source == "sam") == (r.score is not None)
    json_regions = p.ask("Compare <region1> and <region2>.", regions=[{"points": [[12, 10]]}, {"scribble": [[5, 5], [30, 30]]}]).to_json()["regions"]
    assert [r["kind"] for r in json_regions] == ["points", "scribble"]
    assert decode_rle(json_regions[0]["mask"]).shape == (40, 50)


def test_an_empty_sam_mask_falls_back_to_the_prompt_shape(seg_model, image, monkeypatch):
    p = FCLMPredictor(seg_model)
    p.set_image(image)
    lo = seg_model.sam.low_res_size
    monkeypatch.setattr(seg_model.sam, "decode_prompts", lambda emb, **kw: (torch.full((1, *lo), -5.0), torch.zeros(1)))
    box, point = p.region_masks([{"box": [10, 5, 30, 20]}, {"points": [[25, 20]]}])
    assert box.source == "fallback" and box.mask.sum() == 20 * 15 and box.mask[5:20, 10:30].all()
    assert point.source == "fallback" and point.mask[20, 25] and point.mask.sum() < 40


def test_polyline_sampling_is_even_along_the_length():
    pts = sample_polyline([[0, 0], [10, 0], [10, 10]], n=5)
    np.testing.assert_allclose(pts, [[0, 0], [5, 0], [10, 0], [10, 5], [10, 10]])
    assert sample_polyline([[3, 4]]) == [[3.0, 4.0]]


@pytest.mark.parametrize(
    "question, regions, message",
    [
        ("What is <region>?", [{"box": [10, 10, 60, 20]}], "region 1: box .* outside the 50×40 image"),
        ("What is <region>?", [{"box": [10, 10, 5, 20]}], "region 1: box .* x1 < x2"),
        ("What is <region>?", [np.zeros((40, 50), bool)], "region 1: the mask is empty"),
        ("What is <region>?", [np.ones((10, 10), bool)], "region 1: mask of shape"),
        ("<region1> or <region2>?", [{"points": [[1, 1]]}, {"points": [[100, 1]]}], "region 2 point 1 .* outside"),
        ("<region1> or <region2>?", [{"points": [[1, 1]]}, {"points": [[2, 1]], "labels": [0]}], "region 2: at least one point must be positive"),
        ("What is <region>?", [{"scribble": [[1, 1], ["a", 2]]}], "region 1 scribble point 2 x must be a finite number"),
        ("What is <region>?", [{"box": [1, 1, 5, 5], "points": [[1, 1]]}], "region 1: give exactly one of"),
        ("What is <region>?", [], "1 <region> placeholder.* but 0 prompt region"),
        ("What is it?", [{"box": [1, 1, 5, 5]}], "1 prompt region.* but no <region> placeholder"),
    ],
)
def test_bad_regions_raise_a_value_error_naming_the_region(tiny_model, image, question, regions, message):
    p = FCLMPredictor(tiny_model)
    p.set_image(image)
    with pytest.raises(ValueError, match=message):
        p.ask(question, regions)


def test_other_misuse_is_a_clear_value_error(tiny_model, image):
    p = FCLMPredictor(tiny_model)
    with pytest.raises(ValueError, match="no image is set"):
        p.ask("Hello?")
    p.set_image(image)
    with pytest.raises(ValueError, match="unknown head 'igvg'"):
        p.ask("Hello?", head="igvg")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        p.ask("Hello?", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        p.set_image(np.zeros((4, 4), np.float32))


def test_streamed_pieces_join_to_the_answer(tiny_model, image):
    p = FCLMPredictor(tiny_model)
    p.set_image(image)
    whole = p.ask("Tell me about <region>.", [{"box": [0, 0, 25, 20]}], max_new_tokens=10)
    stream = p.ask("Tell me about <region>.", [{"box": [0, 0, 25, 20]}], max_new_tokens=10, stream=True)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    _answers_equal(stream.answer, whole)


def test_chat_keeps_earlier_turns_and_their_regions(tiny_model, image):
    p = FCLMPredictor(tiny_model)
    p.set_image(image)
    chat = p.chat()
    first = chat.ask("What is <region>?", regions=[{"box": [0, 0, 20, 20]}], max_new_tokens=6)
    second = chat.ask("And its colour?", max_new_tokens=6)
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    assert chat.history[1]["content"] == first.text
    # the same as asking with the history spelled out
    explicit = p.ask("And its colour?", history=[{"role": "user", "content": "What is <region>?", "regions": [first.regions[0].mask]},
                                                 {"role": "assistant", "content": first.text}], max_new_tokens=6)
    _answers_equal(second, explicit)
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens
    chat.reset()
    assert chat.history == []


def test_sampling_is_repeatable_with_a_seed(tiny_model, image):
    p = FCLMPredictor(tiny_model)
    p.set_image(image)
    cfg = SamplingConfig(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    assert p.ask("Say something.", sampling=cfg).text == p.ask("Say something.", sampling=cfg).text


def test_bfloat16_on_cpu_grounds_at_the_image_size(new_seg_model, image):
    model = new_seg_model()
    p = FCLMPredictor(model, dtype=torch.bfloat16)
    assert p.model.qwen.dtype == torch.bfloat16 and p.model.sam.mask_decoder.iou_token.weight.dtype == torch.bfloat16
    answer = p.ask("Segment <region>.", regions=[{"box": [10, 5, 30, 20]}], image=image)
    assert answer.text == "[SEG]"
    mask = answer.segments[0].instances[0].mask
    assert mask.shape == (40, 50) and mask.dtype == bool
    assert np.isfinite(answer.segments[0].instances[0].score)


def test_phrase_before_each_seg():
    assert _phrase("<p>a red circle</p> ") == "a red circle"
    assert _phrase("A man <p>holding</p> text <p>a dog</p> ") == "a dog"
    assert _phrase(" It is the left cup. ") == "It is the left cup"


def test_later_questions_reuse_the_image_prefix_cache(seg_model, image):
    """The LM runs over system turn + image once per image; later questions feed only their own tokens,
    and answer as the uncached path does."""
    from fclm.inference import answer_batch

    fed = []
    hook = seg_model.qwen.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        p = FCLMPredictor(seg_model)
        p.set_image(image)
        first = p.ask("Please segment the <region>.", regions=[{"box": [10, 5, 30, 20]}])
        n_first = list(fed)
        fed.clear()
        second = p.ask("Now segment the thing in the middle of the picture.")
        n_second = list(fed)
    finally:
        hook.remove()
    prefix = p._prefix.length
    assert n_first[0] == prefix  # the first question computes the prefix on its own
    assert second.prompt_tokens == prefix + n_second[0]  # the later one feeds only its own tokens
    proc = seg_model.processor
    uncached = answer_batch(seg_model, proc.collate([proc.encode_record(
        {"id": "q", "messages": [{"role": "user", "content": "Now segment the thing in the middle of the picture."}]},
        image, add_generation_prompt=True)], padding_side="left"))[0]
    assert uncached.text == second.text
    assert (uncached.segments[0].instances[0].mask != second.segments[0].instances[0].mask).mean() < 1e-3
    assert first.text == "[SEG]"
    p.set_image(image)
    assert p._prefix is None  # a new image starts a new prefix
