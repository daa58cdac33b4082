"""DLC-Bench: answer parsing, scoring, the live judge (fake OpenAI-compatible server), resume, replay."""

from __future__ import annotations

import json

import pytest
from metrics_testkit import FakeJudge

from fclm.metrics import OpenAIChatJudge, dlc_bench, dlc_replay, parse_pred, score_answers
from fclm.metrics.dlc import DlcJudgeError, EvalInputError, format_prompt, recognition_question

COLOR = ["The wing is not mentioned.", "The color is not mentioned.", "The color is mentioned and is wrong.", "The color is mentioned and is right."]


@pytest.mark.parametrize(
    "answer, choices, want",
    [
        ("D. The color is mentioned and is right.", COLOR, 3),
        ("b", COLOR, 1),
        ("Yes", ["Yes", "No"], 0),
        ("A. Yes", ["Yes", "No"], 0),
        ("no, it is not", ["Yes", "No"], 1),  # single substring
        ("c. something else", COLOR, 2),  # letter prefix
        ("it is dark red", ["red", "dark red"], 0),  # several substrings → the last-occurring one
        ("red", ["dark red", "red wine"], 0),  # answer inside choices → longest (tie: first)
        ("maybe", ["Yes", "No"], None),
        ("", COLOR, None),
        ("e", COLOR, None),  # letter beyond the choices (the reference crashes)
        ("e. whatever", COLOR, None),
    ],
)
def test_parse_pred(answer, choices, want):
    assert parse_pred(answer, choices) == want


def test_recognition_question_inflection():
    assert recognition_question("apple")["question"].startswith("Is it likely that the object in the description is an apple or an object")
    assert recognition_question("bus")["question"].startswith("Is it likely that the object in the description is a bus or")
    assert recognition_question("birds")["question"].startswith("Is it likely that the objects in the description are birds or objects")


def _questions():
    rec = recognition_question("bird")
    pos = [{"question": f"P{i}", "choices": [[c, s] for c, s in zip(COLOR, [0, 0.5, -1, 1])], "type": "positive"} for i in range(3)]
    neg = [{"question": f"N{i}", "choices": [["Mentioned, wrongly.", -1], ["Not mentioned.", 1]], "type": "negative"} for i in range(2)]
    return [rec, *pos, *neg]


def test_score_answers_caps_when_not_recognized_and_scores_unparsable_as_zero():
    qs = _questions()
    body = ["D", "B", "C", "B. Not mentioned.", "A. Mentioned, wrongly."]  # pos 1, 0.5, -1; neg 1, -1
    info = score_answers(qs, ["A. Yes", *body])
    assert info["score_pos"] == pytest.approx(0.5 / 3) and info["score_neg"] == pytest.approx(0.0)
    assert info["recognition_result"] is True
    capped = score_answers(qs, ["B. No", *body])
    assert [d["eval_result"] for d in capped["details_positives"]] == [0, 0, -1]
    assert capped["score_pos"] == pytest.approx(-1 / 3) and capped["score_neg"] == pytest.approx(-0.5)
    unparsable = score_answers(qs, ["A. Yes", "no idea at all", "B", "C", "B", "zzz"])
    assert [d["eval_result"] for d in unparsable["details_positives"]] == [0, 0.5, -1]
    assert unparsable["score_neg"] == pytest.approx(0.5) and unparsable["n_unparsable"] == 2


def _bench(tmp_path):
    bench = tmp_path / "DLC-bench"
    bench.mkdir()
    qa = {
        "k1": [  # choices best-last, so the fake judge picks score 1 / 1
            {"question": "Q1", "choices": [["The wing is not mentioned.", 0], ["The wing is wrong.", -1], ["The wing is right.", 1]], "type": "positive"},
            {"question": "Q2", "choices": [["Wrong color.", -1], ["Not mentioned.", 1]], "type": "negative"},
        ],
        "k2": [{"question": "Q3", "choices": [["Absent.", 0], ["Present.", 1]], "type": "positive"}],  # no negatives
        "k3": [
            {"question": "Q4", "choices": [["Absent.", 0], ["Present.", 0.5]], "type": "positive"},
            {"question": "Q5", "choices": [["Wrong.", -1], ["Fine.", 1]], "type": "negative"},
        ],
    }
    (bench / "qa.json").write_text(json.dumps(qa))
    (bench / "class_names.json").write_text(json.dumps({"k1": "bird", "k2": "apples", "k3": "zebra"}))
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({"k1": "A small bird with grey wings.", "k2": "Red apples.", "k3": "A zebra with stripes."}))
    return caps, bench


@pytest.fixture
def judge_server():
    server = FakeJudge()
    yield server
    server.close()


def test_live_judge_resume_and_replay(tmp_path, judge_server):
    caps, bench = _bench(tmp_path)
    judge = OpenAIChatJudge(judge_server.endpoint, "judge-model")
    out = tmp_path / "out"
    s = dlc_bench(caps, bench, judge, out, model="judge-model")
    # k1: pos 1, neg 1; k2: pos 1; k3: recognition "No" (zebra) → pos min(0, .5) = 0, neg min(0, 1) = 0
    assert s["pos"] == pytest.approx((1 + 1 + 0) / 3)
    assert s["neg"] == pytest.approx((1 + 0) / 2)
    assert s["avg"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["n_judge_calls"] == 8 and s["n_not_recognized"] == 1 and s["n_keys_with_negatives"] == 2
    req = judge_server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["temperature"] == 0 and req["max_tokens"] == 300 and req["model"] == "judge-model"
    assert req["messages"][0]["content"] == format_prompt("A small bird with grey wings.", recognition_question("bird"))
    for name in ("summary.json", "summary.md", "per_sample.jsonl", "eval_cache.json", "judge_cache.jsonl"):
        assert (out / name).is_file()

    # resume: everything cached → no call; one answer lost → exactly one call
    n = len(judge_server.requests)
    again = dlc_bench(caps, bench, judge, out, model="judge-model")
    assert len(judge_server.requests) == n and again["n_cached_answers"] == 8
    lines = (out / "judge_cache.jsonl").read_text().splitlines()
    (out / "judge_cache.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # cut short, as by a kill
    third = dlc_bench(caps, bench, judge, out, model="judge-model")
    assert len(judge_server.requests) == n + 1 and third["avg"] == pytest.approx(s["avg"])
    dlc_bench(caps, bench, judge, out, model="judge-model")
    assert len(judge_server.requests) == n + 1  # the re-asked answer was stored on a line of its own

    # replay of our own eval cache gives the same numbers
    r = dlc_replay(out / "eval_cache.json", tmp_path / "replay")
    assert (r["pos"], r["neg"], r["avg"]) == pytest.approx((s["pos"], s["neg"], s["avg"]))
    assert json.loads((tmp_path / "replay" / "summary.json").read_text())["avg"] == pytest.approx(s["avg"])


def test_changed_caption_is_judged_again_and_unparsable_answers_score_zero(tmp_path, judge_server):
    caps, bench = _bench(tmp_path)
    judge = OpenAIChatJudge(judge_server.endpoint, "m")
    dlc_bench(caps, bench, judge, tmp_path / "out", model="m")
    n = len(judge_server.requests)
    caps.write_text(json.dumps({"k1": "mumble", "k2": "Red apples.", "k3": "A zebra with stripes."}))
    s = dlc_bench(caps, bench, judge, tmp_path / "out", model="m")
    assert len(judge_server.requests) == n + 3  # only k1's three questions
    assert s["n_unparsable_answers"] == 2
    assert s["pos"] == pytest.approx((0 + 1 + 0) / 3) and s["neg"] == pytest.approx(0.0)


def test_missing_captions_need_a_default(tmp_path, judge_server):
    caps, bench = _bench(tmp_path)
    caps.write_text(json.dumps({"k1": "A bird.", "k2": "Error: model crashed"}))
    judge = OpenAIChatJudge(judge_server.endpoint, "m")
    with pytest.raises(EvalInputError, match=r"2 benchmark key\(s\) have no usable caption.*'k2', 'k3'"):
        dlc_bench(caps, bench, judge, tmp_path / "out", model="m")
    s = dlc_bench(caps, bench, judge, tmp_path / "out", model="m", default_prediction="An object.")
    assert s["n_default_prediction"] == 2


def test_judge_http_error_names_the_url(tmp_path, judge_server):
    caps, bench = _bench(tmp_path)
    judge_server.status = 500
    with pytest.raises(DlcJudgeError, match=rf"judge {judge_server.endpoint}/chat/completions: HTTP 500"):
        dlc_bench(caps, bench, OpenAIChatJudge(judge_server.endpoint, "m"), tmp_path / "out", model="m")


def test_replay_reparses_pred_answer_not_eval_result(tmp_path):
    qs = _questions()
    info = score_answers(qs, ["A. Yes", "D", "B", "C", "B. Not mentioned.", "A. Mentioned, wrongly."])
    entry = {"pred": "caption", **info}
    entry["details_positives"][0]["eval_result"] = -1  # tampered: pred_answer "D" is worth 1
    entry["details_recognition"][0]["pred_answer"] = "B. No"  # re-parsed → not recognised → caps apply
    path = tmp_path / "cache_eval.json"
    path.write_text(json.dumps({"key1": entry, "avg_pos": 0.9, "avg_neg": 0.9}))
    s = dlc_replay(path, tmp_path / "out")
    assert s["pos"] == pytest.approx((0 + 0 - 1) / 3) and s["neg"] == pytest.approx((0 - 1) / 2)
    assert s["avg"] == pytest.approx((s["pos"] + s["neg"]) / 2)
    assert s["n_eval_result_changed"] >= 2
    path.write_text(json.dumps({"key1": {"pred": "x"}}))
    with pytest.raises(EvalInputError, match=r"key 'key1': not Describe Anything's eval-cache layout"):
        dlc_replay(path, tmp_path / "out2")


def test_malformed_benchmark_question_is_named(tmp_path, judge_server):
    caps, bench = _bench(tmp_path)
    qa = json.loads((bench / "qa.json").read_text())
    qa["k2"][0]["choices"] = [["only text"]]
    (bench / "qa.json").write_text(json.dumps(qa))
    with pytest.raises(EvalInputError, match=r"qa.json\['k2'\]\[0\]: a question must be"):
        dlc_bench(caps, bench, OpenAIChatJudge(judge_server.endpoint, "m"), tmp_path / "out", model="m")
