"""Auto-captioning: template, prefix, only-missing/overwrite, CSV round trip, backups, tiny random models.

The models are tiny and random, built here (no download): these tests check the plumbing, not caption
quality.
"""

from __future__ import annotations

import csv
import io

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image
from tiny_captioners import WORDS, build_tiny_blip, build_tiny_clip

from lora_trainer.cli import main
from lora_trainer.data.caption_set import BACKUP_DIR
from lora_trainer.data.captioners import REVISIONS, ClipTagger, make_captioner
from lora_trainer.data.captions import read_metadata_csv
from lora_trainer.data.label import label_dataset
from lora_trainer.errors import LoraTrainerError


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


class Fake:
    """A captioner that says which image it saw (by its colour)."""

    name = "fake"

    def __init__(self):
        self.seen = 0

    def caption(self, images):
        self.seen += len(images)
        return [f"  color {img.getpixel((0, 0))[0]}  " for img in images]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for k in range(5):
        Image.new("RGB", (40, 30), (k * 10, 0, 0)).save(root / f"img{k}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (root / "img1.txt").write_text("from a sidecar")
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([["filename", "prompt"], ["img0.png", 'kept, "quoted", caption'],
                                                     ["gone.png", "a row we must keep"]])
    (root / "metadata.csv").write_text(out.getvalue())
    return root


def rows(root):
    entries, problems = read_metadata_csv(root / "metadata.csv")
    assert not problems
    return {name: e.caption for name, e in entries.items()}


def test_only_missing_with_template_and_prefix(folder):
    before = (folder / "metadata.csv").read_text()
    fake = Fake()
    result = label_dataset(folder, captioner=fake, template="**{caption}**, high quality", prefix="trig, ",
                           progress=False)
    assert sorted(result.captioned) == ["img2.png", "img3.png", "img4.png"]
    assert sorted(result.kept) == ["img0.png", "img1.png"] and fake.seen == 3
    assert [name for name, _ in result.skipped] == ["broken.jpg"]
    got = rows(folder)
    assert got["img2.png"] == "trig, **color 20**, high quality"
    assert got["img0.png"] == 'kept, "quoted", caption' and got["gone.png"] == "a row we must keep"
    assert "img1.png" not in got and (folder / "img1.txt").read_text() == "from a sidecar"  # untouched
    assert (result.backup / "metadata.csv").read_text() == before
    again = Fake()
    assert label_dataset(folder, captioner=again, progress=False).captioned == [] and again.seen == 0


def test_images_of_a_kohya_folder_without_their_own_caption_are_captioned(tmp_path):
    """Its class tokens are what an image trains with when it has no caption; the captioner still writes one."""
    for k in range(3):
        (tmp_path / "img" / "10_sks dog").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (k * 10, 0, 0)).save(tmp_path / "img" / "10_sks dog" / f"d{k}.png")
    (tmp_path / "img" / "10_sks dog" / "d0.txt").write_text("own caption")
    result = label_dataset(tmp_path / "img", captioner=Fake(), prefix="sks dog, ", progress=False)
    assert sorted(result.captioned) == ["10_sks dog/d1.png", "10_sks dog/d2.png"]
    assert result.kept == ["10_sks dog/d0.png"]
    assert rows(tmp_path / "img")["10_sks dog/d1.png"] == "sks dog, color 10"


def test_overwrite_replaces_every_caption(folder):
    seen = []
    result = label_dataset(folder, captioner=Fake(), mode="overwrite", progress=False,
                           on_progress=lambda done, total: seen.append((done, total)), batch_size=2)
    assert len(result.captioned) == 5 and seen[-1] == (6, 6)
    got = rows(folder)
    assert got["img0.png"] == "color 0" and got["img1.png"] == "color 10"  # csv now wins over the sidecar
    assert (folder / "img1.txt").read_text() == "from a sidecar"


def test_a_captioner_is_made_only_when_needed(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("done already")

    def never():
        raise AssertionError("no model should load when nothing is missing")

    assert label_dataset(tmp_path, captioner=never, progress=False).kept == ["a.png"]
    assert not (tmp_path / "metadata.csv").exists()


@pytest.mark.parametrize("template, words", [("no placeholder", "has no {caption}"),
                                             ("{caption} {oops}", "not valid"), ("{caption", "not valid")])
def test_bad_templates_and_options_fail_first(folder, template, words):
    with pytest.raises(LoraTrainerError, match=words):
        label_dataset(folder, captioner=Fake(), template=template, progress=False)
    with pytest.raises(LoraTrainerError, match="mode must be"):
        label_dataset(folder, captioner=Fake(), mode="sometimes", progress=False)
    with pytest.raises(LoraTrainerError, match="does not exist"):
        label_dataset(folder, captioner=Fake(), output_csv=folder / "no" / "x.csv", progress=False)


def test_missing_model_needs_download(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(LoraTrainerError, match="not downloaded yet.*--download"):
        make_captioner("blip", model="nobody/no-such-blip-model")
    with pytest.raises(LoraTrainerError, match="captioning-base is not downloaded yet .about 990 MB"):
        make_captioner("blip")  # the default model
    with pytest.raises(LoraTrainerError, match="clip-vit-base-patch32 is not downloaded yet .about 600 MB"):
        make_captioner("clip-tags")
    with pytest.raises(LoraTrainerError, match="cannot load a blip model from this folder"):
        make_captioner("blip", model=str(tmp_path))
    for path in ("./models/blip", str(tmp_path / "nope"), "~/no/such/blip"):
        with pytest.raises(LoraTrainerError, match="model folder .* does not exist"):
            make_captioner("blip", model=path)  # a folder, never looked up on the hub
    with pytest.raises(LoraTrainerError, match="unknown captioner 'wd14'.*blip, clip-tags"):
        make_captioner("wd14")
    with pytest.raises(LoraTrainerError, match="--top-k: only for the clip-tags captioner"):
        make_captioner("blip", top_k=3)
    fake = Fake()
    assert make_captioner(fake) is fake  # a host's own captioner (the WebUI's interrogators) passes through


def _cache_entry(cache, repo, sha, files_from, ref="main", skip=()):
    """A model in a Hugging Face cache laid out as a download leaves it."""
    entry = cache / ("models--" + repo.replace("/", "--"))
    snap = entry / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        if f.name not in skip:
            (snap / f.name).write_bytes(f.read_bytes())
    if ref:
        (entry / "refs").mkdir()
        (entry / "refs" / ref).write_text(sha)
    return snap


def test_cached_models_load_offline(tmp_path, monkeypatch, tiny_blip, tiny_clip):
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    _cache_entry(cache, "someone/tiny-blip", "a" * 40, tiny_blip)
    assert "someone/tiny-blip" in make_captioner("blip", model="someone/tiny-blip").name
    # the default CLIP is read from its safetensors commit, not main (which holds pickled weights only)
    _cache_entry(cache, "openai/clip-vit-base-patch32", REVISIONS["openai/clip-vit-base-patch32"], tiny_clip,
                 ref=None)
    assert isinstance(make_captioner("clip-tags"), ClipTagger)
    _cache_entry(cache, "someone/half-blip", "b" * 40, tiny_blip, skip=("model.safetensors",))
    with pytest.raises(LoraTrainerError, match="only partly in the Hugging Face cache.*--download"):
        make_captioner("blip", model="someone/half-blip")


def test_download_only_when_asked(tmp_path, monkeypatch, tiny_blip, caplog):
    cache, calls = tmp_path / "hub", []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def fake_snapshot_download(repo, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo, local_files_only, allow_patterns))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(_cache_entry(cache, repo, "c" * 40, tiny_blip))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(LoraTrainerError, match="not downloaded yet"):
        make_captioner("blip")
    assert [local for _, local, _ in calls] == [True]  # no download without --download
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoraTrainerError, match="HF_HUB_OFFLINE is set"):
        make_captioner("blip", download=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with caplog.at_level("INFO"):
        make_captioner("blip", download=True)
    assert "downloading the blip model Salesforce/blip-image-captioning-base (about 990 MB)" in caplog.text
    repo, local, patterns = calls[-1]
    assert not local and "model.safetensors" in patterns
    assert not any(".bin" in p or ".h5" in p for p in patterns)  # only the safetensors weights are fetched


def test_captioner_output_is_checked(folder):
    class Empty(Fake):
        def caption(self, images):
            return ["  "] * len(images)

    result = label_dataset(folder, captioner=Empty(), progress=False)
    why = dict(result.skipped)
    assert result.captioned == [] and sorted(why) == ["broken.jpg", "img2.png", "img3.png", "img4.png"]
    assert why["img2.png"] == "the captioner returned no text" and not (folder / BACKUP_DIR).exists()

    class Short(Fake):
        def caption(self, images):
            return ["one"]

    with pytest.raises(LoraTrainerError, match="captioner fake returned 1 captions for 2 images"):
        label_dataset(folder, captioner=Short(), progress=False, batch_size=3)
    with pytest.raises(LoraTrainerError, match="input folder .*nope does not exist"):
        label_dataset(folder / "nope", captioner=Fake(), progress=False)


def test_tiny_blip_captions_through_the_cli(folder, tiny_blip, capsys):
    code = main(["label", "--input", str(folder), "--model", str(tiny_blip), "--template", "{caption}, x",
                 "--prefix", "trig, ", "--overwrite", "--batch-size", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "captioned 5 images" in out and "skipped broken.jpg" in out
    got = rows(folder)
    for k in range(5):
        words = got[f"img{k}.png"].removeprefix("trig, ").removesuffix(", x").split()
        assert words and set(words) <= set(WORDS)  # text the tiny model generated from its vocabulary
    assert len(list((folder / BACKUP_DIR).iterdir())) == 1


def test_tiny_clip_tags(folder, tiny_clip, tmp_path):
    tags = tmp_path / "tags.txt"
    tags.write_text("red\nblue  # a comment\n\ngreen\nred\n")
    tagger = make_captioner("clip-tags", model=str(tiny_clip), tags_file=tags)
    assert isinstance(tagger, ClipTagger) and tagger.tags == ["red", "blue", "green"]
    tagger.top_k = 2
    images = [Image.new("RGB", (50, 40), (200, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 200))]
    out = tagger.caption(images)
    assert len(out) == 2 and all(len(c.split(", ")) == 2 and set(c.split(", ")) <= {"red", "blue", "green"}
                                 for c in out)
    tagger.threshold = 1.0  # no tag is that similar: the best one is still kept
    assert [c.split(", ") for c in tagger.caption(images)] == [[c.split(", ")[0]] for c in out]
    with pytest.raises(LoraTrainerError, match="threshold is a cosine similarity"):
        make_captioner("clip-tags", model=str(tiny_clip), threshold=2.0)
    assert main(["label", "--input", str(folder), "--captioner", "clip-tags", "--model", str(tiny_clip)]) == 0
    assert len(rows(folder)) == 5  # img0 kept, img1 keeps its sidecar, three tagged, gone.png kept
    assert main(["label", "--input", str(folder), "--tags", str(tags)]) == 2  # tags are for clip-tags
    assert main(["label", "--input", str(folder), "--captioner", "clip-tags", "--model", str(tiny_clip),
                 "--overwrite", "--top-k", "3", "--threshold", "-1"]) == 0
    assert all(len(c.split(", ")) == 3 for c in rows(folder).values() if c != "a row we must keep")


def test_large_jpegs_reach_the_captioner_decoded_at_a_reduced_scale_in_order(tmp_path):
    class Sizes(Fake):
        def caption(self, images):
            self.sizes = getattr(self, "sizes", []) + [img.size for img in images]
            return super().caption(images)

    for k in range(5):  # alternate photo-sized JPEGs and small PNGs
        img = Image.new("RGB", (2048, 1536) if k % 2 == 0 else (40, 30), (k * 10, 0, 0))
        img.save(tmp_path / f"img{k}.{'jpg' if k % 2 == 0 else 'png'}", quality=95)
    fake = Sizes()
    result = label_dataset(tmp_path, captioner=fake, batch_size=2, progress=False)
    assert len(result.captioned) == 5
    # 1/2 scale: the smallest of libjpeg's scales still at least 768 px on both sides
    assert fake.sizes == [(1024, 768), (40, 30), (1024, 768), (40, 30), (1024, 768)]
    got = rows(tmp_path)  # each caption with its own image (JPEG may shift a solid colour by a level or two)
    seen = [int(got[f"img{k}.{'jpg' if k % 2 == 0 else 'png'}"].split()[1]) for k in range(5)]
    assert all(abs(v - k * 10) <= 3 for k, v in enumerate(seen)), seen
