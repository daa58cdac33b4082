"""The web page of ``fclm-serve`` in a real headless Chromium, against the real server and a rigged tiny model.

Needs Debian's chromium and chromium-driver (``bash scripts/browser_deps.sh``); without them the test fails
(it never skips). Screenshots go to ``runs/serve_page*.png`` (git-ignored) and to the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from serve_fixtures import data_url, running_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
RUNS = Path(__file__).resolve().parents[2] / "runs"
W, H = 160, 120

SNAPSHOT_JS = """
const c = document.getElementById('canvas');
window.__snap = {w: c.width, h: c.height, data: c.getContext('2d').getImageData(0, 0, c.width, c.height).data.slice()};
return [c.width, c.height];
"""
# pixels that differ from the snapshot (-1: the canvas changed size)
DIFF_JS = """
const c = document.getElementById('canvas'), s = window.__snap;
if (c.width !== s.w || c.height !== s.h) return -1;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) {
  if (Math.abs(d[i] - s.data[i]) + Math.abs(d[i + 1] - s.data[i + 1]) + Math.abs(d[i + 2] - s.data[i + 2]) > 24) n++;
}
return n;
"""


def _chrome():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: the browser test needs Debian's chromium and chromium-driver; "
                    "run `bash scripts/browser_deps.sh`", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _test_image(path: Path) -> Path:
    im = Image.new("RGB", (W, H), (236, 236, 228))
    d = ImageDraw.Draw(im)
    d.rectangle([20, 20, 70, 80], fill=(200, 40, 40))
    d.ellipse([90, 40, 150, 110], fill=(40, 90, 200))
    im.save(path)
    return path


def _screenshot(driver, name: str, tmp_path: Path) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    out = RUNS / name
    assert driver.save_screenshot(str(out)), f"could not save {out}"
    shutil.copy(out, tmp_path / name)


def _drag(driver, canvas, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag on the canvas between two points given in ORIGINAL image pixels."""
    from selenium.webdriver.common.action_chains import ActionChains

    rect = canvas.rect
    sx, sy = rect["width"] / W, rect["height"] / H

    def offset(p):  # Selenium 4: offsets from the element's centre
        return round(p[0] * sx - rect["width"] / 2), round(p[1] * sy - rect["height"] / 2)

    (x0, y0), (x1, y1) = offset(start), offset(end)
    chain = ActionChains(driver, duration=20).move_to_element_with_offset(canvas, x0, y0).click_and_hold()
    for k in range(1, 5):
        chain.move_by_offset(round((x1 - x0) / 4 * k) - round((x1 - x0) / 4 * (k - 1)),
                             round((y1 - y0) / 4 * k) - round((y1 - y0) / 4 * (k - 1)))
    chain.release().perform()


def _no_page_errors(driver) -> None:
    """No JavaScript errors in the console (refused requests log "Failed to load resource": expected here)."""
    problems = [e["message"] for e in driver.get_log("browser")
                if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
    assert not problems, problems


def _ask(driver, question: str) -> None:
    from selenium.webdriver.common.by import By

    q = driver.find_element(By.ID, "question")
    q.clear()
    q.send_keys(question)
    driver.find_element(By.ID, "ask").click()


@pytest.fixture(scope="module")
def page(seg_model_dir):
    """(driver, base URL): headless Chromium and a real ``fclm-serve`` of the rigged tiny model."""
    from fclm.inference import FCLMPredictor

    predictor = FCLMPredictor.from_pretrained(seg_model_dir)
    driver = _chrome()
    try:
        with running_server(predictor) as base:
            yield driver, base
    finally:
        driver.quit()


def test_page_draws_a_box_asks_and_shows_masks(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, base = page
    image_path = _test_image(tmp_path / "shapes.png")
    wait = WebDriverWait(driver, 60)
    driver.get(base + "/")
    assert driver.title == "FCLM"
    for element_id in ("file", "canvas", "tool-box", "tool-points", "tool-scribble", "question", "ask", "answer",
                       "segments", "error", "download-json"):
        driver.find_element(By.ID, element_id)

    # open the image: shown on the canvas, scaled to fit
    driver.find_element(By.ID, "file").send_keys(str(image_path))
    canvas = driver.find_element(By.ID, "canvas")
    wait.until(lambda d: canvas.rect["width"] > W)
    assert abs(canvas.rect["width"] / canvas.rect["height"] - W / H) < 0.02

    # a box, drawn with the mouse, arrives in original image pixels
    driver.find_element(By.ID, "tool-box").click()
    _drag(driver, canvas, (20, 20), (70, 80))
    items = driver.find_elements(By.CSS_SELECTOR, "#regions-list li")
    assert len(items) == 1
    box = json.loads(items[0].get_attribute("data-region"))["box"]
    assert all(abs(a - b) <= 1.5 for a, b in zip(box, [20, 20, 70, 80])), box

    width, height = driver.execute_script(SNAPSHOT_JS)   # image + the region's outline
    assert width > W and height > H
    _ask(driver, "What is <region>?")
    wait.until(lambda d: "[SEG]" in d.find_element(By.ID, "answer").text
               and d.find_elements(By.CSS_SELECTOR, "#segments > *"))
    wait.until(lambda d: d.execute_script(DIFF_JS) > 200)    # the mask overlay is drawn (asynchronously)
    assert not driver.find_element(By.ID, "error").is_displayed()
    on = driver.execute_script(DIFF_JS)
    assert on > 200

    # the [SEG] chip has the colour of its segment
    chip = driver.find_element(By.CSS_SELECTOR, "#answer .chip")
    swatch = driver.find_element(By.CSS_SELECTOR, "#segments .swatch")
    assert chip.value_of_css_property("background-color") == swatch.value_of_css_property("background-color")
    assert chip.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "transparent")
    assert driver.find_element(By.ID, "download-json").is_enabled()
    _screenshot(driver, "serve_page.png", tmp_path)

    # toggling the segment off removes its overlay, on brings it back
    toggle = driver.find_element(By.CSS_SELECTOR, "#segments > * input[type=checkbox]")
    toggle.click()
    wait.until(lambda d: d.execute_script(DIFF_JS) == 0)
    toggle.click()
    wait.until(lambda d: d.execute_script(DIFF_JS) == on)

    # a second turn, streamed: the earlier turn and its region travel with it (the server checks the count)
    driver.find_element(By.ID, "stream").click()
    _ask(driver, "And <region1> once more?")
    wait.until(lambda d: "Q1:" in d.find_element(By.ID, "conversation").text
               and "[SEG]" in d.find_element(By.ID, "answer").text
               and d.find_elements(By.CSS_SELECTOR, "#segments > *")
               and d.find_element(By.ID, "question").get_attribute("value") == "")
    assert not driver.find_element(By.ID, "error").is_displayed()

    # more placeholders than regions: the server refuses, the page shows its message
    _ask(driver, "Compare <region> with <region>.")
    error = driver.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed() and error.text)
    assert "fclm.regions: 2 region(s) given but the user messages have 4 <region> placeholder(s)" in error.text
    _screenshot(driver, "serve_page_error.png", tmp_path)

    _no_page_errors(driver)


def _mask_url(shape: str, xy: list[int]) -> str:
    mask = Image.new("L", (W, H), 0)
    getattr(ImageDraw.Draw(mask), shape)(xy, fill=255)
    return data_url(mask)


STUB_JS = """
const reply = arguments[0];
const realFetch = window.fetch;
window.__sent = null;
window.fetch = async (url, init) => {
  if (String(url).endsWith('/v1/chat/completions')) {
    window.__sent = JSON.parse(init.body);
    return new Response(JSON.stringify(reply), {status: 200, headers: {'Content-Type': 'application/json'}});
  }
  return realFetch(url, init);
};
"""


def test_page_tools_and_phrase_colours(page, tmp_path):
    """Points and scribble regions in image pixels; a GCG-style answer (stubbed in the page: the rigged model only
    says [SEG]) with each phrase coloured like its chip, its segment and its mask."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver, base = page
    wait = WebDriverWait(driver, 60)
    driver.get(base + "/")
    driver.find_element(By.ID, "file").send_keys(str(_test_image(tmp_path / "shapes.png")))
    canvas = driver.find_element(By.ID, "canvas")
    wait.until(lambda d: canvas.rect["width"] > W)
    rect = canvas.rect
    sx, sy = rect["width"] / W, rect["height"] / H

    def at(x, y):
        return round(x * sx - rect["width"] / 2), round(y * sy - rect["height"] / 2)

    # points: two positive clicks and a shift-click (negative) form one region, ended by switching tools
    driver.find_element(By.ID, "tool-points").click()
    (ActionChains(driver).move_to_element_with_offset(canvas, *at(40, 50)).click()
     .move_to_element_with_offset(canvas, *at(50, 60)).click()
     .key_down(Keys.SHIFT).move_to_element_with_offset(canvas, *at(120, 75)).click().key_up(Keys.SHIFT).perform())
    driver.find_element(By.ID, "tool-scribble").click()
    _drag(driver, canvas, (100, 60), (140, 90))
    regions = [json.loads(li.get_attribute("data-region"))
               for li in driver.find_elements(By.CSS_SELECTOR, "#regions-list li")]
    assert len(regions) == 2, regions
    assert regions[0]["labels"] == [1, 1, 0]
    for (x, y), want in zip(regions[0]["points"], [(40, 50), (50, 60), (120, 75)]):
        assert abs(x - want[0]) <= 1.5 and abs(y - want[1]) <= 1.5, regions[0]
    scribble = regions[1]["scribble"]
    assert len(scribble) >= 2 and all(0 <= x < W and 0 <= y < H for x, y in scribble)
    assert abs(scribble[0][0] - 100) <= 1.5 and abs(scribble[-1][1] - 90) <= 1.5, scribble

    reply = {
        "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "fclm",
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": "The <p>red square</p> [SEG] is left of the <p>blue circle</p> [SEG]."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22},
        "fclm": {"image_size": [H, W], "segments": [
            {"phrase": "red square", "head": "sam",
             "instances": [{"mask": _mask_url("rectangle", [20, 20, 70, 80]), "box": [20, 20, 71, 81], "score": 0.9}]},
            {"phrase": "blue circle", "head": "sam",
             "instances": [{"mask": _mask_url("ellipse", [90, 40, 150, 110]), "box": [90, 40, 151, 111], "score": 0.8}]},
        ]},
    }
    driver.execute_script(STUB_JS, reply)
    driver.execute_script(SNAPSHOT_JS)
    _ask(driver, "Is <region2> right of <region1>?")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#segments > *")) == 2)
    wait.until(lambda d: d.execute_script(DIFF_JS) > 1000)

    sent = driver.execute_script("return window.__sent")
    assert sent["fclm"]["regions"] == [regions[1], regions[0]]
    assert sent["fclm"]["mask_format"] == "png"
    assert sent["messages"][0]["content"][0]["type"] == "image_url"
    assert sent["messages"][0]["content"][1] == {"type": "text", "text": "Is <region> right of <region>?"}

    answer = driver.find_element(By.ID, "answer")
    assert "<p>" not in answer.text and "red square" in answer.text
    phrases = driver.find_elements(By.CSS_SELECTOR, "#answer .phrase")
    chips = driver.find_elements(By.CSS_SELECTOR, "#answer .chip")
    swatches = driver.find_elements(By.CSS_SELECTOR, "#segments .swatch")
    assert [p.text for p in phrases] == ["red square", "blue circle"]
    colours = [c.value_of_css_property("background-color") for c in chips]
    assert colours[0] != colours[1]
    for k in range(2):
        assert phrases[k].value_of_css_property("border-bottom-color") == colours[k]
        assert swatches[k].value_of_css_property("background-color") == colours[k]
    _screenshot(driver, "serve_page_phrases.png", tmp_path)
    _no_page_errors(driver)
