"""fclm-serve over real HTTP on loopback: grounding with RLE masks, region captions, SSE streaming, the
unmodified openai client, multi-turn regions, file:// under the allowed root, the key, the queue."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_fixtures import data_url, running_server

from fclm.inference import FCLMPredictor
from fclm.masks import decode_rle
from serve.app import ServeSettings


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(3).rand(40, 50, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def allowed(tmp_path_factory, image):
    root = tmp_path_factory.mktemp("allowed")
    image.save(root / "img.png")
    return root


@pytest.fixture(scope="module")
def server(seg_model_dir, allowed):
    with running_server(FCLMPredictor.from_pretrained(seg_model_dir), ServeSettings(allowed_root=allowed)) as url:
        yield url


@pytest.fixture(scope="module")
def caption_server(tiny_model_dir):
    with running_server(FCLMPredictor.from_pretrained(tiny_model_dir), ServeSettings(model_name="tiny")) as url:
        yield url


def _body(image: Image.Image, text: str, regions=(), **extra) -> dict:
    body = {"model": "fclm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": text}]}], **extra}
    if regions:
        body["fclm"] = {"regions": list(regions)}
    return body


def test_grounding_returns_rle_masks_of_the_image_size(server, image):
    r = httpx.post(f"{server}/v1/chat/completions", json=_body(image, "Please segment the <region> object.", [{"box": [5, 5, 30, 25]}]), timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"] == {"role": "assistant", "content": "[SEG]"}
    assert out["choices"][0]["finish_reason"] == "stop"
    seg = out["fclm"]["segments"][0]
    mask = decode_rle(seg["instances"][0]["mask"])
    assert mask.shape == (40, 50) and mask.any()
    ys, xs = np.nonzero(mask)
    assert seg["instances"][0]["box"] == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    assert out["fclm"]["image_size"] == [40, 50]
    region = out["fclm"]["regions"][0]
    assert region["kind"] == "box" and region["box"] and decode_rle(region["mask"]).shape == (40, 50)
    assert out["usage"]["completion_tokens"] == 2  # "[SEG]" + <|im_end|>
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 2


def test_usage_and_answer_equal_the_predictor(seg_model_dir, server, image):
    direct = FCLMPredictor.from_pretrained(seg_model_dir).ask("Please segment it.", image=image)
    out = httpx.post(f"{server}/v1/chat/completions", json=_body(image, "Please segment it."), timeout=60).json()
    assert out["usage"]["prompt_tokens"] == direct.prompt_tokens
    assert np.array_equal(decode_rle(out["fclm"]["segments"][0]["instances"][0]["mask"]), direct.segments[0].instances[0].mask)


def test_png_masks_on_request(server, image):
    body = _body(image, "Segment it.")
    body["fclm"] = {"mask_format": "png", "include_regions": False}
    out = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    url = out["fclm"]["segments"][0]["instances"][0]["mask"]
    assert url.startswith("data:image/png;base64,") and "regions" not in out["fclm"]
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert png.shape == (40, 50) and set(np.unique(png)) <= {0, 255}


def test_region_caption_with_a_box_answers_text(caption_server, image):
    r = httpx.post(f"{caption_server}/v1/chat/completions",
                   json=_body(image, "Describe <region> in a few words.", [{"box": [2, 3, 40, 30]}], max_tokens=8), timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "tiny" and isinstance(out["choices"][0]["message"]["content"], str)
    assert out["choices"][0]["message"]["content"] and out["usage"]["completion_tokens"] <= 8
    assert out["fclm"]["regions"][0]["kind"] == "box"


def test_streaming_sends_well_formed_sse_chunks_and_done(caption_server, image):
    body = _body(image, "Describe <region>.", [{"points": [[10, 10]], "labels": [1]}], max_tokens=8, stream=True,
                 stream_options={"include_usage": True})
    with httpx.stream("POST", f"{caption_server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and "fclm" in final[0]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] >= 1
    plain = httpx.post(f"{caption_server}/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert text == plain["choices"][0]["message"]["content"] and usage == plain["usage"]


def test_the_openai_client_works_unchanged(server, image):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [json.loads(httpx.get(f"{server}/v1/models").text)["data"][0]["id"]]
    messages = _body(image, "What is <region>? Segment it.")["messages"]
    done = client.chat.completions.create(model="fclm", messages=messages, extra_body={"fclm": {"regions": [{"scribble": [[5, 5], [30, 20]]}]}})
    assert done.choices[0].message.content == "[SEG]"
    masks = done.model_extra["fclm"]["segments"][0]["instances"]
    assert decode_rle(masks[0]["mask"]).shape == (40, 50)
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="fclm", messages=messages, stream=True, extra_body={"fclm": {"regions": [{"box": [1, 1, 9, 9]}]}}) if c.choices]
    assert "".join(p for p in pieces if p) == "[SEG]"


def test_earlier_turns_keep_their_regions(caption_server, image):
    first = _body(image, "What is <region>?", max_tokens=4)
    answer = httpx.post(f"{caption_server}/v1/chat/completions", json={**first, "fclm": {"regions": [{"box": [0, 0, 20, 20]}]}}, timeout=60).json()
    messages = first["messages"] + [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                                    {"role": "user", "content": "And <region>?"}]
    second = httpx.post(f"{caption_server}/v1/chat/completions", json={"messages": messages, "max_tokens": 4,
                                                                         "fclm": {"regions": [{"box": [0, 0, 20, 20]}, {"box": [20, 20, 50, 40]}]}}, timeout=60)
    assert second.status_code == 200, second.text
    assert [r["kind"] for r in second.json()["fclm"]["regions"]] == ["box"]  # the regions of the question asked
    assert second.json()["usage"]["prompt_tokens"] > answer["usage"]["total_tokens"]
    wrong = httpx.post(f"{caption_server}/v1/chat/completions", json={"messages": messages, "fclm": {"regions": [{"box": [0, 0, 20, 20]}]}})
    assert wrong.status_code == 400 and "1 region(s) given but the user messages have 2" in wrong.json()["error"]["message"]


def test_file_urls_only_under_the_allowed_root(server, allowed, tmp_path):
    ok = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{allowed / 'img.png'}"}},
                                                    {"type": "text", "text": "Segment it."}]}]}
    assert httpx.post(f"{server}/v1/chat/completions", json=ok, timeout=60).status_code == 200
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    for url in (f"file://{tmp_path / 'secret.png'}", f"file://{allowed}/../{tmp_path.name}/secret.png", "file:///etc/passwd",
                "http://127.0.0.1:1/x.png"):
        bad = json.loads(json.dumps(ok))
        bad["messages"][0]["content"][0]["image_url"]["url"] = url
        r = httpx.post(f"{server}/v1/chat/completions", json=bad, timeout=60)
        assert r.status_code in (400, 403) and r.json()["error"]["message"], url


@pytest.mark.parametrize("mutate, status, words", [
    (lambda b: b.update(fclm={"regions": [{"box": [10, 10, 90, 20]}]}), 400, "region 1: box"),
    (lambda b: b.update(fclm={"regions": [{"box": [1, 1, 5, 5]}] * 17}), 400, "more than --max-regions"),
    (lambda b: b.update(n=2), 400, "n:"),
    (lambda b: b.update(max_tokens=10**6), 400, "max_tokens"),
    (lambda b: b.update(messages=[{"role": "user", "content": "no image"}]), 400, "no image"),
    (lambda b: b.update(fclm={"head": "igvg"}), 400, "unknown head 'igvg'"),
    (lambda b: b["messages"][0]["content"].__setitem__(0, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}), 400, "not a readable image"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, image, mutate, status, words):
    body = _body(image, "Segment <region>.", [{"box": [1, 1, 9, 9]}])
    mutate(body)
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_limits_key_health_and_schema(seg_model_dir, image):
    big = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    settings = ServeSettings(api_key="s3cret", max_image_pixels=50 * 50, max_body_bytes=200_000)
    with running_server(FCLMPredictor.from_pretrained(seg_model_dir), settings) as url:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        headers = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 200
        r = httpx.post(f"{url}/v1/chat/completions", json=_body(big, "Segment it."), headers=headers, timeout=60)
        assert r.status_code == 413 and "64×64" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/chat/completions", content=b"x" * 300_000, headers={**headers, "content-type": "application/json"})
        assert r.status_code == 413
        assert httpx.post(f"{url}/v1/chat/completions", json=_body(image, "Segment it."), headers=headers, timeout=60).status_code == 200
        schema = httpx.get(f"{url}/openapi.json").json()
        assert "/v1/chat/completions" in schema["paths"] and "FclmOptions" in schema["components"]["schemas"]
        assert "<title>" in httpx.get(f"{url}/").text


def test_requests_queue_on_one_model_thread_and_a_slow_client_blocks_no_one(server, image):
    import socket

    body = json.dumps(_body(image, "Segment it.")).encode()
    host, port = server.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])  # and then nothing more, for now
    results: list[int] = []

    def ask() -> None:
        results.append(httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60).status_code)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert results == [200] * 6
    slow.sendall(body[100:])
    reply = slow.recv(200)
    slow.close()
    assert reply.startswith(b"HTTP/1.1 200")
