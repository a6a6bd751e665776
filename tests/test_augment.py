"""Caption augmentation (data.augment): shuffled tags with the prefix, the first keep_tokens tags and the **core**
tags always first and never dropped; tag and caption dropout at their rates; every draw from (seed, epoch, image);
the run encodes the augmented captions each step instead of caching them. Tiny models on the CPU."""

from __future__ import annotations

import pytest
from safetensors import safe_open
from test_train import StopAt, make_cfg

from lora_trainer.config import config_from_dict
from lora_trainer.data.augment import CaptionAugment
from lora_trainer.data.captions import split_tags, strip_markdown
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.trainer import train
from lora_trainer.errors import ConfigError

RAW = "a red circle, **demo style**, soft light, blue ground, plain, centred, small, flat colours"
PREFIX = "zxq trigger, "


def draws(aug, n=2000, raw=RAW):
    text, core = strip_markdown(raw)
    return [aug.caption(PREFIX + text, core, image=i % 7, epoch=i // 7) for i in range(n)]


def test_kept_prefix_keep_tokens_and_core_tags_never_move_or_drop():
    aug = CaptionAugment(shuffle=True, keep_tokens=1, tag_dropout_rate=0.5, prefix=PREFIX)
    seen_orders = set()
    for caption in draws(aug):
        tags = split_tags(caption)
        assert tags[:3] == ["zxq trigger", "a red circle", "demo style"]  # prefix, first tag, core tag
        rest = tags[3:]
        assert set(rest) <= set(split_tags(RAW.replace("**", ""))) and len(rest) == len(set(rest))
        seen_orders.add(tuple(rest))
    assert len(seen_orders) > 100  # shuffled and dropped, not one fixed order


def test_core_tags_come_first_without_keep_tokens():
    aug = CaptionAugment(shuffle=True, tag_dropout_rate=0.9)
    text, core = strip_markdown("a, b, **c**, d, **e, f**, g")
    for epoch in range(50):
        assert split_tags(aug.caption(text, core, 0, epoch))[:3] == ["c", "e", "f"]


def test_dropout_rates_hold_over_many_draws():
    tags = split_tags(RAW.replace("**", ""))
    droppable = len(tags) - 1  # all but the core tag (no keep_tokens)
    aug = CaptionAugment(tag_dropout_rate=0.25, prefix=PREFIX)
    kept = [len(split_tags(c)) - 2 for c in draws(aug, 4000)]  # (less the prefix and the core tag)
    assert sum(kept) / (len(kept) * droppable) == pytest.approx(0.75, abs=0.02)
    empty = sum(c == "" for c in draws(CaptionAugment(dropout_rate=0.3, prefix=PREFIX), 4000)) / 4000
    assert empty == pytest.approx(0.3, abs=0.03)
    # without shuffle or tag dropout a caption that is not dropped is the caption as written
    assert set(draws(CaptionAugment(dropout_rate=0.3, prefix=PREFIX), 200)) == {"", PREFIX + strip_markdown(RAW)[0]}


def test_every_nth_epoch_has_no_captions():
    aug = CaptionAugment(shuffle=True, dropout_every_n_epochs=3)
    text, core = strip_markdown(RAW)
    empty = [e for e in range(9) if aug.caption(text, core, 4, e) == ""]
    assert empty == [2, 5, 8]  # the 3rd, 6th and 9th epoch (kohya counts from 1)


def test_each_draw_is_a_function_of_seed_epoch_and_image():
    a, b = CaptionAugment(shuffle=True, seed=1), CaptionAugment(shuffle=True, seed=2)
    text, core = strip_markdown(RAW)
    assert a.caption(text, core, 3, 5) == CaptionAugment(shuffle=True, seed=1).caption(text, core, 3, 5)
    assert len({a.caption(text, core, 3, e) for e in range(20)}) > 10
    assert [a.caption(text, core, 3, e) for e in range(20)] != [b.caption(text, core, 3, e) for e in range(20)]


def test_bad_settings_are_named():
    base = {"train_data_dir": "x"}
    with pytest.raises(ConfigError, match="caption_dropout_rate"):
        config_from_dict({**base, "caption_dropout_rate": 1.5})
    with pytest.raises(ConfigError, match="keep_tokens"):
        config_from_dict({**base, "keep_tokens": -1})
    with pytest.raises(ConfigError, match="weighted_captions.*shuffle_caption"):
        config_from_dict({**base, "weighted_captions": True, "shuffle_caption": True})
    # kohya's flat keys, as its configs write them
    cfg = config_from_dict({**base, "shuffle_caption": True, "keep_tokens": 2, "caption_tag_dropout_rate": 0.1})
    assert (cfg.data.shuffle_caption, cfg.data.keep_tokens, cfg.data.caption_tag_dropout_rate) == (True, 2, 0.1)
    assert CaptionAugment.from_config(config_from_dict(base).data, 0) is None  # all off: captions as written


def test_a_run_encodes_the_augmented_captions_each_step(tmp_path, monkeypatch, caplog):
    from lora_trainer.models.diffusers_backend import DiffusersBackend

    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)
    encoded = []
    real = DiffusersBackend.encode_prompts

    def spy(self, captions, **kw):
        encoded.append(list(captions))
        return real(self, captions, **kw)

    monkeypatch.setattr(DiffusersBackend, "encode_prompts", spy)
    caplog.set_level("INFO")
    cfg = make_cfg(data, tmp_path / "out", max_train_steps=6, cache_latents=True)
    cfg.data.shuffle_caption, cfg.data.caption_prefix = True, "zxq, "
    result = train(cfg, progress=False)
    assert "encoded each step, not cached" in caplog.text and "captions augmented: tags shuffled" in caplog.text
    trained = [c for batch in encoded for c in batch if c]
    assert len(trained) >= 12 and all(c.startswith("zxq, ") for c in trained)
    as_written = {"zxq, " + line.split(",", 1)[1].strip().strip('"') for line in
                  (data / "metadata.csv").read_text().splitlines()[1:]}
    assert set(trained) - as_written, "no caption was shuffled"
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_shuffle_caption"], meta["ss_keep_tokens"], meta["ss_caption_tag_dropout_rate"]) == \
        ("True", "0", "0.0")


def test_an_image_repeated_in_an_epoch_gets_a_new_draw_each_time(tmp_path, monkeypatch):
    """kohya's ``<repeats>_<name>`` folders train an image several times an epoch; kohya shuffles and drops anew each
    time, so a 1-epoch run of 8 repeats sees several orders (not one order 8 times), and a resume the same ones."""
    from PIL import Image

    from lora_trainer.models.diffusers_backend import DiffusersBackend

    folder = tmp_path / "img" / "8_zxq"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.png")
    (folder / "a.txt").write_text("zxq, red, round, small, flat, bright, plain, centred", encoding="utf-8")
    encoded = []
    real = DiffusersBackend.encode_prompts

    def spy(self, captions, **kw):
        encoded.extend(captions)
        return real(self, captions, **kw)

    monkeypatch.setattr(DiffusersBackend, "encode_prompts", spy)

    def cfg(out, **kw):
        c = make_cfg(tmp_path / "img", tmp_path / out, random_flip=False, batch_size=1, max_train_steps=8,
                     save_steps=4, **kw)
        c.data.shuffle_caption, c.data.keep_tokens, c.data.caption_dropout_rate = True, 1, 0.3
        return c

    train(cfg("a"), progress=False)
    whole, encoded[:] = list(encoded), []
    assert len(whole) == 8 and all(c == "" or c.startswith("zxq, ") for c in whole)
    assert len(set(whole)) >= 4, f"the repeats of one epoch drew alike: {whole}"
    assert 0 < whole.count("") < 8  # (dropped some of the times, not all or none)
    assert train(cfg("b"), callbacks=StopAt(4), progress=False).status == "stopped"
    train(cfg("b", resume_from_checkpoint="latest"), progress=False)
    assert encoded == whole  # (a resume draws what the whole run drew)
