"""Drive lora-trainer's "Train LoRA" tab in a real A1111 v1.10.1 (the harness's), as a new user would, with
Playwright (sync API) and Debian's chromium. The WebUI must already run with the extension installed
(run_a1111.sh beside this file does copy + install + start + this + stop). Grown from ../shared/a1111-host's
drive, with the checks of issue #14 (idle buttons, the sweep's message, skipped images, "making sample",
s/step, the loss plot's axes, the run's name, the cleared sweep, errors naming the field).

  1. open the UI, click "Train LoRA", screenshot
  2. make a dataset (make_dataset.py: 16 good + 6 bad images), fill the fields, Train; screenshots during/after
  3. models/Lora/<name>.safetensors exists, GET /sdapi/v1/loras lists it, txt2img "<lora:name:0.7>" differs from
     the plain prompt, and the plain prompt is bit-identical to what it gave before training
  4. strength sweep, "Send to txt2img" (the txt2img prompt gets the tag), "Train & generate"; screenshots
  5. bad input (a missing folder, an empty folder): a clear error in the tab, the WebUI still generates the same image

Prints one line per check and a JSON summary (also written to $SHOTS/drive_summary.json); exit 1 if a check failed.
Env: PORT (7861), LORA_HARNESS, SHOTS ($HOME/a1111-host-shots), CHROMIUM (/usr/bin/chromium),
TRAIN_STEPS (8), BATCH (2), TRAIN_TE / TRAIN_TE2 / CHECKPOINTING (1: tick "Train the text encoder" / "... second text
encoder (SDXL)" / "Gradient checkpointing"), SWEEP_STRENGTHS ("0, 0.5, 1"; the tab's sweep runs 20 sampling steps per image),
TG_STRENGTHS ("0, 1": the sweep after Train & generate), DATASET_KIND (full | simple), MAKE_DATASET (a script DIR that writes a dataset; used when DATASET_KIND=full).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright

PORT = int(os.environ.get("PORT", "7861"))
BASE = f"http://127.0.0.1:{PORT}"
H = Path(os.environ.get("LORA_HARNESS", Path.home() / "a1111-host"))
SHOTS = Path(os.environ.get("SHOTS", Path.home() / "a1111-host-shots"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TRAIN_STEPS = int(os.environ.get("TRAIN_STEPS", "8"))
TRAIN_TIMEOUT = int(os.environ.get("TRAIN_TIMEOUT", "3600"))  # s a training may take (a loaded 2-core machine: long)
BATCH = int(os.environ.get("BATCH", "2"))
SWEEP_STRENGTHS = os.environ.get("SWEEP_STRENGTHS", "0, 0.5, 1")
TG_STRENGTHS = os.environ.get("TG_STRENGTHS", "0, 1")
MAKE_DATASET = os.environ.get("MAKE_DATASET", "")
TRAIN_TE = os.environ.get("TRAIN_TE", "") == "1"  # tick "Train the text encoder" (the file then has lora_te_ keys)
CHECKPOINTING = os.environ.get("CHECKPOINTING", "") == "1"  # tick "Gradient checkpointing"
TRAIN_TE2 = os.environ.get("TRAIN_TE2", "") == "1"  # tick "Train the second text encoder (SDXL)": Forge's SDXL
DATASET_KIND = os.environ.get("DATASET_KIND", "simple")  # simple: 12 plain PNGs; full: the set MAKE_DATASET writes
GEN = dict(width=64, height=64, steps=3, seed=1234, sampler_name="Euler", cfg_scale=7.0)
P = "#lora_trainer_"

results: list[dict] = []
timings: dict[str, float] = {}


def check(step: str, ok: bool, evidence: str):
    results.append({"step": step, "ok": bool(ok), "evidence": evidence})
    print(f"[{'PASS' if ok else 'FAIL'}] {step}: {evidence}", flush=True)


class Timer:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        timings[self.name] = round(time.time() - self.t0, 1)
        print(f"  ({self.name}: {timings[self.name]} s)", flush=True)


# ---------------------------------------------------------------- the API
def api(path, payload=None, timeout=900):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(BASE + path, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if payload is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def txt2img(prompt: str) -> np.ndarray:
    d = api("/sdapi/v1/txt2img", {"prompt": prompt, **GEN})
    return np.array(Image.open(io.BytesIO(base64.b64decode(d["images"][0]))).convert("RGB"))


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()[:12]


def maxdiff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def lora_names() -> list[str]:
    return [x["name"] for x in api("/sdapi/v1/loras")]


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def moved_from_zero(path: Path, hdr: dict, prefix: str) -> tuple[int, int]:
    """(how many of the file's ``prefix`` up weights are not all zero, how many there are): the LoRA's up weights
    start at zero, so a part that trained has moved them."""
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
        ups = [v for k, v in hdr.items() if k.startswith(prefix) and k.endswith(".lora_up.weight")]
        moved = 0
        for v in ups:
            a, b = v["data_offsets"]
            f.seek(start + a)
            moved += any(f.read(b - a))
        return moved, len(ups)


# ---------------------------------------------------------------- the page
def shot(page, name, selector="#tab_lora_trainer"):
    path = SHOTS / f"{name}.png"
    try:
        if selector:
            page.locator(selector).first.screenshot(path=str(path), timeout=30000)
        else:
            page.screenshot(path=str(path), full_page=False)
    except Exception as e:  # an element too tall or not visible: take the window
        print(f"  element screenshot failed ({e.__class__.__name__}); taking the viewport", flush=True)
        page.screenshot(path=str(path))
    print(f"  screenshot {path}", flush=True)
    return str(path)


def field(page, elem_id):
    return page.locator(f"{P}{elem_id} textarea, {P}{elem_id} input").first


def set_field(page, elem_id, value):
    box = field(page, elem_id)
    box.fill(str(value))
    box.press("Tab")  # blur: gradio reads the value on input/blur
    page.wait_for_timeout(200)


def status_text(page) -> str:
    return page.locator(f"{P}status").first.inner_text().strip()


def lora_file_value(page) -> str:
    return field(page, "lora_file").input_value().strip()


def open_tab(page):
    page.locator("#tabs button", has_text="Train LoRA").first.click()
    page.wait_for_selector(f"{P}root", state="visible", timeout=30000)


def wait_training(page, name, timeout_s=None, shot_during=None, prev=None):
    """Until the status shows done/error (or the LoRA path appears). Returns (status text, seen during).
    prev: the status before the click; while it (or gradio's "queue: …" line) still shows, it is not this run's."""
    t0, timeout_s = time.time(), timeout_s or TRAIN_TIMEOUT
    during, seen = None, []
    # the elapsed/ETA line over a pending output: gradio 3's "1.2/3.4s", gradio 4's (Forge) "processing | 1.2/3.4s"
    timer = re.compile(r"^(processing \| )?\d+(\.\d+)?(/\d+(\.\d+)?)?s\n")
    prev = timer.sub("", prev) if prev is not None else None
    while time.time() - t0 < timeout_s:
        s = status_text(page)
        if s and (not seen or seen[-1] != s):
            seen.append(s)
        if prev is not None and (timer.sub("", s) == prev or s.startswith(("queue:", "processing |"))):
            time.sleep(0.5)
            continue
        if shot_during and during is None and "step" in s and "/" in s and "0/" not in s.split("·")[0]:
            page.wait_for_timeout(1500)
            during = shot(page, shot_during)
        err = page.locator(f"{P}status .lora_trainer_error").count()
        done = page.locator(f"{P}status .lora_trainer_done").count()
        if err or done:  # the text read above may be from just before the class appeared: read it again
            return status_text(page), seen, during
        time.sleep(1)
    return status_text(page), seen, during


def gallery_srcs(page, elem_id):
    return page.eval_on_selector_all(f"{P}{elem_id} img", "els => els.map(e => e.src)")


def fetch_img(page, src) -> np.ndarray:
    r = page.request.get(src)
    return np.array(Image.open(io.BytesIO(r.body())).convert("RGB"))


def wait_gallery(page, elem_id, n, before=(), timeout_s=1800):
    """Until the gallery shows n images none of which was there before."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        srcs = list(dict.fromkeys(gallery_srcs(page, elem_id)))
        fresh = [s for s in srcs if s not in before]
        if len(fresh) >= n:
            return fresh
        time.sleep(2)
    return list(dict.fromkeys(gallery_srcs(page, elem_id)))


# ---------------------------------------------------------------- the drive
def main():
    SHOTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lora-drive-", dir=Path.home()))
    stamp = time.strftime("%H%M%S")
    name, name2 = f"drive_{stamp}", f"drive_{stamp}_tg"
    lora_dir = H / "webui/models/Lora"

    with Timer("baseline txt2img (before training, 64x64, 3 steps)"):
        base = txt2img("a photo")
        base_lora_list = lora_names()
    print(f"  baseline image sha256 {digest(base)}; Lora list has {len(base_lora_list)} entries", flush=True)

    with Timer("make dataset"):
        ds = work / "dataset"
        if DATASET_KIND == "simple":  # 12 plain RGB images with .txt captions, nothing awkward
            ds.mkdir()
            rng = np.random.default_rng(0)
            for i in range(12):
                y, x = np.mgrid[0:96, 0:96]
                c = rng.uniform(0.2, 1.0, 3)
                a = np.stack([(np.sin(x / (5 + i)) * .5 + .5) * c[0], y / 96 * c[1], ((x + y) % 32 < 16) * c[2]], -1)
                Image.fromarray((a * 255).astype(np.uint8)).save(ds / f"img{i:02d}.png")
                (ds / f"img{i:02d}.txt").write_text(f"neon street {i}, glowing signage")
            # two files that are not images: the tab must say "12 images used, 2 skipped", with the reasons
            (ds / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 24)
            (ds / "notes.png").write_text("not an image")
            print(f"  simple dataset: 12 png + txt, 2 unreadable .png in {ds}", flush=True)
        else:
            out = subprocess.run([sys.executable, MAKE_DATASET, str(ds)], capture_output=True, text=True)
            print(f"  make_dataset: {out.stdout.strip()[-300:]} {out.stderr.strip()[-300:]}", flush=True)
        empty = work / "empty"
        empty.mkdir()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        console_errors = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: console_errors.append(str(e)))

        # 1. open the UI, the tab
        with Timer("1 open UI + Train LoRA tab"):
            page.goto(BASE, timeout=120000)
            page.wait_for_selector("#tabs", timeout=120000)
            page.wait_for_selector("#txt2img_prompt textarea", timeout=120000)
            open_tab(page)
        shot(page, "01_tab", selector=None)
        labels = page.locator(f"{P}root").inner_text()
        check("1 tab opens", all(x in labels for x in ("Dataset folder", "LoRA name", "Train")),
              f"tab shows Dataset folder / LoRA name / Train ({len(labels)} chars of text)")

        # 1b. nothing trained yet: Stop and Send to txt2img cannot be clicked, the sweep says what to do
        with Timer("1b idle tab"):
            stop_off = page.locator(f"{P}stop").first.is_disabled()
            send_off = page.locator(f"{P}send_txt2img").first.is_disabled()
            page.locator(f"{P}sweep").click()
            page.wait_for_timeout(3000)
            sweep_msg = page.locator(f"{P}sweep_status").first.inner_text().strip()
            error_pills = page.locator("#tab_lora_trainer >> text=/^Error$/").count()
        shot(page, "01b_idle_sweep")
        check("1b idle: Stop and Send to txt2img cannot be clicked", stop_off and send_off,
              f"Stop disabled={stop_off}, Send to txt2img disabled={send_off}")
        check("1b sweep with nothing trained says 'train a LoRA first' (no Error pill)",
              "Train a LoRA first" in sweep_msg and error_pills == 0, f"{sweep_msg!r}; Error pills: {error_pills}")

        # 2. fill, train
        with Timer("2 fill fields"):
            set_field(page, "data_dir", ds)
            set_field(page, "name", name)
            page.locator(f"{P}advanced .label-wrap").first.click()
            page.wait_for_timeout(500)
            set_field(page, "resolution", 64)
            set_field(page, "max_train_steps", TRAIN_STEPS)
            set_field(page, "batch_size", BATCH)
            set_field(page, "sample_prompt", "a photo")
            set_field(page, "sample_every", max(1, TRAIN_STEPS // 2))  # two samples
            # caption augmentation (issue 18): shuffled tags; the caption grid shows one epoch's draw under each
            page.locator(f"{P}shuffle_caption input").first.check()
            for key, on in (("train_text_encoder", TRAIN_TE), ("train_text_encoder_2", TRAIN_TE2),
                            ("gradient_checkpointing", CHECKPOINTING)):
                if on:
                    page.locator(f"{P}{key} input").first.check()
            page.wait_for_timeout(300)
        with Timer("2 caption grid: load, the augmented draw"):
            page.locator(f"{P}dataset .label-wrap").first.click()
            page.wait_for_timeout(500)
            page.locator(f"{P}load_captions").click()
            page.wait_for_selector(f"{P}dataset .lora_trainer_trainer_example", timeout=60000)
            examples = [e.inner_text().strip() for e in page.locator(f"{P}dataset .lora_trainer_trainer_example").all()]
        shot(page, "02b_caption_grid", selector=f"{P}dataset")
        check("2 the caption grid shows an augmented draw while Shuffle is ticked",
              bool(examples) and all(e.startswith("e.g. one epoch:") and "neon street" in e for e in examples),
              f"{len(examples)} draws, e.g. {examples[:2]!r}")
        shot(page, "02_filled")
        with Timer("2 train (click → done)"):
            page.locator(f"{P}train").click()
            final, seen, during = wait_training(page, name, shot_during="03_training")
        shot(page, "04_trained")
        print(f"  status lines seen: {seen[:3]} ... {seen[-2:]}", flush=True)
        path = lora_file_value(page)
        check("2 training finishes in the tab", "error" not in page.locator(f"{P}status").first.inner_html() and bool(path),
              f"final status {final!r}; 'Trained LoRA' box = {path!r}; screenshot during: {during}")
        losses_svg = page.locator(f"{P}loss").first.inner_html()
        check("2 loss curve drawn", "<polyline" in losses_svg, "loss SVG has a polyline" if "<polyline" in losses_svg
              else page.locator(f"{P}loss").first.inner_text())
        samples = list(dict.fromkeys(gallery_srcs(page, "samples")))
        check("2 sample image during training", len(samples) >= 1, f"{len(samples)} image(s) in 'Samples during training'")
        sampling = [s for s in seen if "making sample" in s]
        check("2 the status says 'making sample k/n' while a sample renders", bool(sampling),
              f"{sampling[:2]}" if sampling else f"never seen in {len(seen)} status lines")
        slow = [s for s in seen if "s/step" in s]
        check("2 a slow run's speed reads as s/step", bool(slow), slow[-1] if slow else f"seen: {seen[-3:]}")
        status_box = page.locator(f"{P}status").first
        skipped_line = status_box.inner_text()
        details = page.locator(f"{P}status details").count()
        check("2 the status says how many images were used and skipped, reasons one click away",
              "12 images used, 2 skipped" in skipped_line and details == 1,
              f"{skipped_line.strip()[:300]!r}; <details> elements: {details}")
        title = page.locator(f"{P}status .lora_trainer_run_name").first.get_attribute("title") or ""
        check("2 the status names the run, the path on hover", str(H) not in skipped_line and str(H) in title,
              f"run name shown, title={title!r}")
        svg = page.locator(f"{P}loss").first.inner_html()
        axes = svg.count("lora_trainer_xtick") >= 2 and svg.count("lora_trainer_ytick") >= 2
        check("2 the loss plot has axes with ticks, each step's loss and a smoothed line",
              axes and "<circle" in svg and "lora_trainer_loss_avg" in svg and ">step<" in svg,
              f"x ticks {svg.count('lora_trainer_xtick')}, y ticks {svg.count('lora_trainer_ytick')}, "
              f"points {svg.count('<circle')}")

        # 3. the file, the list, the effect, the restore
        with Timer("3 file + list + txt2img x2"):
            f = lora_dir / f"{name}.safetensors"
            ok = f.is_file()
            ev = f"{f} missing"
            if ok:
                hdr = safetensors_header(f)
                meta = hdr.pop("__metadata__", {})
                ev = (f"{f.name}: {f.stat().st_size} bytes, sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}, "
                      f"{len(hdr)} tensors, e.g. {sorted(hdr)[0]}, ss_network_module={meta.get('ss_network_module')}, "
                      f"ss_base_model_version={meta.get('ss_base_model_version')}, resolution={meta.get('ss_resolution')}, "
                      f"ss_network_dim={meta.get('ss_network_dim')}, ss_network_alpha={meta.get('ss_network_alpha')}, "
                      f"sshs_model_hash={str(meta.get('sshs_model_hash'))[:16]}, sshs_legacy_hash={meta.get('sshs_legacy_hash')}, "
                      f"{len(meta)} metadata keys")
            check("3 models/Lora/<name>.safetensors written", ok and str(f) == path or ok, ev + f"; tab path {path}")
            if TRAIN_TE:
                te_keys = [k for k in hdr if k.startswith("lora_te")] if ok else []
                moved, ups = moved_from_zero(f, hdr, "lora_te") if ok else (0, 0)
                check("3 the text encoder trained too (TRAIN_TE): its LoRA is in the file and learned",
                      bool(te_keys) and moved > 0,
                      f"{len(te_keys)} text-encoder tensors, e.g. {te_keys[:1]}; {moved} of {ups} up weights moved "
                      f"from zero (gradient checkpointing {'on' if CHECKPOINTING else 'off'})")
            if TRAIN_TE2:
                moved, ups = moved_from_zero(f, hdr, "lora_te2_") if ok else (0, 0)
                check("3 SDXL's second text encoder trained too (TRAIN_TE2): lora_te2_ in the file and learned",
                      moved > 0, f"{moved} of {ups} lora_te2_ up weights moved from zero")
            buckets = json.loads(meta.get("ss_bucket_info") or "null") if ok else None
            check("3 the file says: trained in buckets, tags shuffled (the tab's fields)",
                  ok and meta.get("ss_enable_bucket") == "True" and meta.get("ss_shuffle_caption") == "True"
                  and bool(buckets and buckets.get("buckets")),
                  f"ss_enable_bucket={meta.get('ss_enable_bucket')}, ss_shuffle_caption={meta.get('ss_shuffle_caption')}, "
                  f"ss_bucket_info={meta.get('ss_bucket_info')}")
            names = lora_names()
            check("3 GET /sdapi/v1/loras lists it", name in names, f"{name} in list: {name in names} ({len(names)} entries)")
            with_lora = txt2img(f"a photo <lora:{name}:0.7>")
            after = txt2img("a photo")
            d_lora = maxdiff(with_lora, base)
            check("3 <lora:name:0.7> changes the image", d_lora > 0,
                  f"max abs pixel diff vs plain prompt = {d_lora} (sha {digest(with_lora)} vs {digest(base)})")
            d_restore = maxdiff(after, base)
            check("3 model restored (plain prompt bit-identical to before training)", d_restore == 0,
                  f"max abs pixel diff = {d_restore} (sha {digest(after)} vs {digest(base)})")

        # 4a. strength sweep
        with Timer(f"4a strength sweep ({SWEEP_STRENGTHS})"):
            set_field(page, "sweep_prompt", "a photo")
            set_field(page, "sweep_seed", 1234)
            set_field(page, "strengths", SWEEP_STRENGTHS)
            set_field(page, "sweep_size", 64)
            set_field(page, "sweep_steps", 3)
            n = len([x for x in SWEEP_STRENGTHS.split(",") if x.strip()])
            page.locator(f"{P}sweep").click()
            page.wait_for_timeout(3000)
            shot(page, "05_sweep_running")
            srcs = wait_gallery(page, "sweep_gallery", n, timeout_s=1200 if path else 30)
        shot(page, "06_sweep_done")
        ev = f"{len(srcs)} images"
        ok = len(srcs) >= n
        if ok:
            imgs = [fetch_img(page, s) for s in srcs[:n]]
            caps = page.locator(f"{P}sweep_gallery").first.inner_text().replace("\n", " | ")[:200]
            ev += f"; max abs diff strength first vs last = {maxdiff(imgs[0], imgs[-1])}; sizes {imgs[0].shape}; captions: {caps}"
        check("4a strength sweep shows one image per strength", ok, ev)

        # 4b. send to txt2img
        with Timer("4b send to txt2img"):
            page.locator(f"{P}send_txt2img").click()
            page.wait_for_timeout(3000)
            prompt = page.locator("#txt2img_prompt textarea").first.input_value()
            selected = page.eval_on_selector_all("#tabs > .tab-nav > button.selected, #tabs > div > button.selected",
                                                 "els => els.map(e => e.innerText.trim())")
            txt2img_visible = page.locator("#tab_txt2img").first.is_visible()
            trainer_visible = page.locator("#tab_lora_trainer").first.is_visible()
        shot(page, "07_sent_to_txt2img", selector="#tab_txt2img")
        shot(page, "07b_after_send_viewport", selector=None)
        check("4b Send to txt2img fills the txt2img prompt", f"<lora:{name}:" in prompt, f"txt2img prompt = {prompt!r}")
        check("4b Send to txt2img switches to the txt2img tab", txt2img_visible and not trainer_visible,
              f"selected tab button(s) {selected}; #tab_txt2img visible={txt2img_visible}; "
              f"#tab_lora_trainer visible={trainer_visible}")
        open_tab(page)

        # 4c. train & generate
        with Timer("4c Train & generate"):
            before = set(gallery_srcs(page, "sweep_gallery"))
            set_field(page, "name", name2)
            set_field(page, "strengths", TG_STRENGTHS)
            set_field(page, "sample_prompt", "")
            n2 = len([x for x in TG_STRENGTHS.split(",") if x.strip()])
            prev = status_text(page)
            page.locator(f"{P}train_generate").click()
            page.wait_for_timeout(6000)
            left_over = len(gallery_srcs(page, "sweep_gallery"))
            check("4c Train & generate clears the previous LoRA's sweep", left_over == 0,
                  f"{left_over} image(s) of the previous sweep on screen 6 s after the click")
            final2, _, _ = wait_training(page, name2, shot_during="08_tg_training", prev=prev)
            srcs2 = wait_gallery(page, "sweep_gallery", n2, before=before,
                                 timeout_s=1200 if "error" not in page.locator(f"{P}status").first.inner_html() else 30)
        shot(page, "09_tg_done")
        f2 = lora_dir / f"{name2}.safetensors"
        check("4c Train & generate: trains, publishes, then sweeps", f2.is_file() and len(srcs2) >= n2 and name2 in lora_names(),
              f"status {final2!r}; {f2.name} exists={f2.is_file()} ({f2.stat().st_size if f2.is_file() else 0} bytes); "
              f"{len(srcs2)} new sweep images; 'Trained LoRA' = {lora_file_value(page)!r}")

        # 4d. merge the LoRA in 'Trained LoRA' into the loaded checkpoint
        with Timer("4d Merge into checkpoint"):
            models = H / "webui/models/Stable-diffusion"
            had = set(models.glob("*.safetensors"))
            set_field(page, "merge_weight", 0.7)
            page.locator(f"{P}merge").click()
            merged, message = [], ""
            for _ in range(600):
                page.wait_for_timeout(1000)
                message = page.locator(f"{P}merge_status").first.inner_text()
                # (gradio's pending line over the output is no answer: "1.1s" in gradio 3, "processing | 1.1s" in 4)
                if message.strip() and not re.match(r"(processing \| )?\d+(\.\d+)?(/\d+(\.\d+)?)?s$", message.strip()):
                    break
            merged = sorted(set(models.glob("*.safetensors")) - had)
        shot(page, "09b_merged")
        listed = [m["filename"] for m in api("/sdapi/v1/sd-models")]
        check("4d Merge into checkpoint writes a new checkpoint the WebUI lists",
              len(merged) == 1 and "merged into a new checkpoint" in message and str(merged[0]) in listed,
              f"new files {[m.name for m in merged]}; listed {str(merged[0]) in listed if merged else None}; "
              f"message {message[:200]!r}")
        for m in merged:
            m.unlink()
        api("/sdapi/v1/refresh-checkpoints", {})

        # 5. bad input
        for label, folder, shotname in (("nonexistent folder", work / "no-such-folder", "10_err_missing"),
                                        ("empty folder", empty, "11_err_empty")):
            with Timer(f"5 {label}"):
                set_field(page, "data_dir", folder)
                set_field(page, "name", f"{name}_bad")
                prev = status_text(page)
                page.locator(f"{P}train").click()
                final3, seen3, _ = wait_training(page, f"{name}_bad", timeout_s=300, prev=prev)
            shot(page, shotname)
            is_err = page.locator(f"{P}status .lora_trainer_error").count() > 0
            bg = page.locator(f"{P}status .lora_trainer_error").first.evaluate(
                "e => getComputedStyle(e).backgroundColor + ' / ' + getComputedStyle(e).color") if is_err else None
            # a bad value names its field ("Dataset folder: …"); a folder without images names the folder
            check(f"5 {label}: clear error in the tab, naming the field or folder",
                  is_err and ("Dataset folder" in final3 or str(folder) in final3),
                  f"status: {final3!r}; background / colour: {bg}")
        with Timer("5 txt2img after errors"):
            again = txt2img("a photo")
        d = maxdiff(again, base)
        check("5 WebUI still generates the same image after the errors", d == 0, f"max abs pixel diff = {d}")
        check("5 nothing published for the bad runs", not (lora_dir / f"{name}_bad.safetensors").exists(), "no *_bad.safetensors")
        # offline, gradio 3.41's page asks a CDN for its fonts (ERR_NAME_NOT_RESOLVED): not the extension's
        console_errors = [e for e in console_errors if "ERR_NAME_NOT_RESOLVED" not in e]
        check("browser console has no errors", not console_errors, "; ".join(console_errors[:5])[:500] or "none")
        browser.close()

    log = (H / "webui.log").read_text(errors="replace")
    tbs = [i for i, line in enumerate(log.splitlines()) if "Traceback" in line]
    ext_tbs = []
    lines = log.splitlines()
    for i in tbs:
        block = "\n".join(lines[i:i + 40])
        if "lora_trainer" in block or "lora-trainer" in block:
            ext_tbs.append(block[:1500])
    check("webui.log has no traceback from the extension", not ext_tbs, f"{len(tbs)} tracebacks in all, {len(ext_tbs)} from the extension"
          + ("".join("\n---\n" + b for b in ext_tbs[:2]) if ext_tbs else ""))

    summary = {"results": results, "timings_s": timings, "names": [name, name2], "workdir": str(work)}
    (SHOTS / "drive_summary.json").write_text(json.dumps(summary, indent=2))
    failed = [r for r in results if not r["ok"]]
    print(json.dumps({"passed": len(results) - len(failed), "failed": len(failed), "timings_s": timings}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
