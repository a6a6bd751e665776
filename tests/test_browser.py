"""The standalone app in a real headless browser: load, start a demo training, see progress and the sweep."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (uses Debian's chromium)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("no chromium (apt-get install chromium)", allow_module_level=True)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def status_and_stop(page, status: str, stop: str) -> tuple[str, bool]:
    """The status line and whether Stop is enabled, read in one go (two reads can straddle the run's end)."""
    return tuple(page.evaluate("([a, b]) => [document.querySelector(a).innerText, !document.querySelector(b).disabled]",
                               [status, stop]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", "ui", "--port", str(port), "--lora-dir",
                             str(tmp_path / "Lora")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read().decode()[-3000:])
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(10)


def open_tab(p, url: str, data, height: int):
    """A headless browser on the app, the dataset folder filled in."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = browser.new_page(viewport={"width": 1300, "height": height})
    # offline: what is not the app (gradio 3's fonts and scripts from a CDN) fails at once instead of timing out
    page.route(lambda u: not u.startswith(url), lambda route: route.abort())
    page.goto(url)
    page.wait_for_selector("#lora_trainer_data_dir textarea", timeout=60_000)
    page.fill("#lora_trainer_data_dir textarea", str(data))
    return browser, page


def shot(page, name: str, selector: str | None = None) -> None:
    """With LORA_TRAINER_SHOTS=DIR, a screenshot of the page (or one element) to DIR/name.png, to look at."""
    folder = os.environ.get("LORA_TRAINER_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = str(Path(folder) / f"{name}.png")
        page.locator(selector).first.screenshot(path=path) if selector else page.screenshot(path=path, full_page=True)


def test_train_and_sweep_in_the_browser(app, tmp_path):
    from lora_trainer.data.demo_set import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    (data / "broken.png").write_bytes(b"not a png")
    with playwright.sync_playwright() as p:
        browser, page = open_tab(p, app, data, height=1100)
        assert page.is_disabled("#lora_trainer_stop")  # nothing runs yet
        page.click("#lora_trainer_sweep")  # nothing trained: a message, not an error pill
        page.wait_for_function("document.querySelector('#lora_trainer_sweep_status').innerText"
                               ".includes('Train a LoRA first')", timeout=30_000)
        page.fill("#lora_trainer_name textarea, #lora_trainer_name input", "browser_lora")
        page.click("#lora_trainer_advanced")
        page.wait_for_selector("#lora_trainer_resolution input")
        page.wait_for_timeout(500)  # the accordion mounts its fields when it opens
        for field, value in [("resolution", "64"), ("max_train_steps", "6"), ("batch_size", "2")]:
            page.fill(f"#lora_trainer_{field} input", value)
            page.press(f"#lora_trainer_{field} input", "Tab")
            assert page.input_value(f"#lora_trainer_{field} input") == value
        page.fill("#lora_trainer_sample_prompt textarea", "demo style")
        page.fill("#lora_trainer_sample_every input", "3")
        page.fill("#lora_trainer_sweep_prompt textarea", "demo style, a red circle")
        page.click("#lora_trainer_train_generate")

        seen, stop_enabled, shot_taken = set(), False, False
        deadline = time.time() + 900  # (a loaded 2-core machine: 6 steps and 2 samples can take minutes)
        while time.time() < deadline:
            text, enabled = status_and_stop(page, "#lora_trainer_status", "#lora_trainer_stop")
            seen.add(text)
            stop_enabled |= enabled and "Finished" not in text  # (Stop is off before the click: the run turned it on)
            if "step " in text and not shot_taken:
                shot(page, "training", "#lora_trainer_root")
                shot_taken = True
            if "Finished" in text or "error" in text.lower():
                break
            time.sleep(0.3)
        assert any("Finished after 6/6 steps" in t for t in seen), seen
        assert any("step " in t and "/6" in t and ("it/s" in t or "s/step" in t) for t in seen), seen
        assert any("(avg of last" in t for t in seen), seen  # the loss says what it is
        assert stop_enabled, seen
        final = page.inner_text("#lora_trainer_status")
        assert "4 images used, 1 skipped" in final and "run browser_lora" in final
        assert "output/runs" not in final  # the run folder's path is in a hover, not in the line
        page.click("#lora_trainer_status summary")  # the skipped images' reasons, one click away
        assert "broken.png" in page.inner_text("#lora_trainer_status")
        ticks = page.eval_on_selector_all("#lora_trainer_loss text.lora_trainer_ytick", "e => e.length")
        assert ticks >= 2 and "average of last 20 steps" in page.inner_text("#lora_trainer_loss")
        page.wait_for_function("document.querySelector('#lora_trainer_stop').disabled", timeout=30_000)
        shot(page, "finished", "#lora_trainer_root")
        page.wait_for_function("document.querySelectorAll('#lora_trainer_sweep_gallery img').length >= 5",
                               timeout=600_000)
        assert page.eval_on_selector_all("#lora_trainer_samples img", "e => e.length") >= 2
        assert page.input_value("#lora_trainer_sweep_size input") == "64"  # the training's resolution
        assert "browser_lora: strengths 0, 0.25" in page.inner_text("#lora_trainer_sweep_status")
        shot(page, "sweep")
        assert page.input_value("#lora_trainer_lora_file textarea, #lora_trainer_lora_file input").endswith(
            "browser_lora.safetensors")
        browser.close()
    assert (tmp_path / "Lora" / "browser_lora.safetensors").is_file()


def test_uncaptioned_folder_to_checked_captioned_set_in_the_browser(app, tmp_path):
    """Auto-caption (a tiny BLIP from a folder), edit one caption, save, check: all in the tab."""
    import numpy as np
    from PIL import Image
    from tiny_captioners import build_tiny_blip

    from lora_trainer.data.captions import read_metadata_csv

    blip = build_tiny_blip(tmp_path / "blip")
    data = tmp_path / "pics"
    data.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((96, 96)).save(data / f"p{k}.png")
    with playwright.sync_playwright() as p:
        browser, page = open_tab(p, app, data, height=1400)
        page.click("#lora_trainer_dataset")
        page.click("#lora_trainer_autocaption")
        page.wait_for_selector("#lora_trainer_caption_model textarea, #lora_trainer_caption_model input")
        page.fill("#lora_trainer_caption_model textarea, #lora_trainer_caption_model input", str(blip))
        page.fill("#lora_trainer_caption_template textarea, #lora_trainer_caption_template input",
                  "**{caption}**, mystyle")
        page.click("#lora_trainer_label")
        page.wait_for_function("document.querySelector('#lora_trainer_grid_status').innerText"
                               ".includes('captioned 5 images')", timeout=120_000)
        first = page.input_value("#lora_trainer_caption_0 textarea")
        assert first.startswith("**") and first.endswith("**, mystyle")
        assert "tokens" in page.inner_text("#lora_trainer_caption_info_0")
        page.fill("#lora_trainer_caption_1 textarea", "mystyle, a picture, not blurry")
        page.press("#lora_trainer_caption_1 textarea", "Control+s")  # javascript/lora_trainer.js: Save
        page.wait_for_function("document.querySelector('#lora_trainer_grid_status').innerText"
                               ".includes('saved 1 captions')", timeout=30_000)
        page.click("#lora_trainer_check")
        page.wait_for_function("document.querySelector('#lora_trainer_check_report').innerText"
                               ".includes('not blurry')", timeout=60_000)
        report = page.inner_text("#lora_trainer_check_report")
        browser.close()
    assert "p1.png" in report and "only 5 images" in report
    rows, _ = read_metadata_csv(data / "metadata.csv")
    assert rows["p1.png"].caption == "mystyle, a picture, not blurry" and len(rows) == 5
    assert rows["p0.png"].caption == first


def test_language_model_mode_trains_and_tries_the_adapter_in_the_browser(app, tmp_path):
    """Task: Language model LoRA; a tiny random LLaMA (lora_trainer.llm.tiny) learns four rows; Try the adapter
    answers one of them."""
    import json

    from lora_trainer.llm.tiny import make_tiny_llama

    colors = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("night", "black")]
    model = make_tiny_llama(tmp_path / "tiny-llama", "what is the color of sky grass blue green snow white night "
                                                     "black".split())
    rows = tmp_path / "colors.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"what is the color of {t}", "completion": c}) + "\n"
                            for t, c in colors), encoding="utf-8")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1400})
        page.route(lambda u: not u.startswith(app), lambda route: route.abort())
        page.goto(app)
        page.wait_for_selector("#lora_trainer_task", timeout=60_000)
        assert not page.is_visible("#lora_trainer_llm_base_model")
        page.click("#lora_trainer_task label:has-text('Language model LoRA')")
        page.wait_for_selector("#lora_trainer_llm_base_model textarea", timeout=30_000)
        assert not page.is_visible("#lora_trainer_data_dir")  # the image mode is hidden
        page.fill("#lora_trainer_llm_base_model textarea", str(model))
        page.fill("#lora_trainer_llm_data textarea", str(rows))
        page.fill("#lora_trainer_llm_name textarea, #lora_trainer_llm_name input", "colors")
        for field, value in [("lora_rank", "8"), ("lora_alpha", "16"), ("lora_dropout", "0"),
                             ("learning_rate", "0.01"), ("epochs", "30"), ("save_steps", "0")]:
            page.fill(f"#lora_trainer_llm_{field} input", value)
            page.press(f"#lora_trainer_llm_{field} input", "Tab")
        page.click("#lora_trainer_llm_train")
        seen, stop_enabled = set(), False
        deadline = time.time() + 300
        while time.time() < deadline:
            text, enabled = status_and_stop(page, "#lora_trainer_llm_status", "#lora_trainer_llm_stop")
            seen.add(text)
            stop_enabled |= enabled and "Finished" not in text  # (30 tiny steps may end between two reads)
            if "Finished" in text or "error" in text.lower():
                break
            time.sleep(0.2)
        assert any("Finished after 30/30 steps: adapter colors" in t for t in seen), seen
        assert stop_enabled, seen
        assert "4 rows trained" in page.inner_text("#lora_trainer_llm_status")
        adapter = page.input_value("#lora_trainer_llm_adapter textarea, #lora_trainer_llm_adapter input")
        assert adapter.endswith("colors/colors")
        page.fill("#lora_trainer_llm_prompt textarea", "what is the color of snow")
        page.fill("#lora_trainer_llm_max_new_tokens input", "2")
        page.press("#lora_trainer_llm_max_new_tokens input", "Tab")
        page.click("#lora_trainer_llm_generate")
        page.wait_for_function("document.querySelector('#lora_trainer_llm_try_status').innerText"
                               ".includes('new tokens')", timeout=120_000)
        output = page.input_value("#lora_trainer_llm_output textarea")
        shot(page, "llm_mode")
        browser.close()
    assert output.strip() == "white"
