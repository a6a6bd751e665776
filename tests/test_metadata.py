"""The ``ss_*`` keys of the aspect-ratio buckets, as kohya's sd-scripts writes them (train_network.py's metadata
block, its datasets' fields in library/train_util.py): every key always, and without buckets
``ss_bucket_no_upscale`` False and the sides None, whatever data.bucket_no_upscale says."""

from __future__ import annotations

import json

import pytest

from lora_trainer.config import config_from_dict
from lora_trainer.export.metadata import ModelFacts, RunFacts, build_metadata

BUCKET_KEYS = ("ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso", "ss_max_bucket_reso",
               "ss_bucket_info")
INFO = {"buckets": {0: {"resolution": (64, 64), "count": 3}}, "mean_img_ar_error": 0.0}


def metadata(bucket_info, **data) -> dict[str, str]:
    cfg = config_from_dict({"train_data_dir": "data", "output_name": "x", "resolution": 64, **data})
    run = RunFacts(steps=1, max_train_steps=1, epoch=1, num_epochs=1, num_train_images=3,
                   tag_frequency={"data": {"a": 3}}, trained_text_encoder=False, started_at=1700000000.0,
                   finished_at=1700000001.0, bucket_info=bucket_info)
    return build_metadata(cfg, ModelFacts("sd_v1", "epsilon", "tiny-demo"), run)


@pytest.mark.parametrize("no_upscale", [False, True])
def test_without_buckets_no_upscale_is_written_false_as_kohya_does(no_upscale):
    meta = metadata(None, enable_bucket=False, bucket_no_upscale=no_upscale)
    assert {k: meta[k] for k in BUCKET_KEYS} == {"ss_enable_bucket": "False", "ss_bucket_no_upscale": "False",
                                                 "ss_min_bucket_reso": "None", "ss_max_bucket_reso": "None",
                                                 "ss_bucket_info": "null"}


@pytest.mark.parametrize("no_upscale", [False, True])
def test_with_buckets_every_bucket_key_says_what_the_run_did(no_upscale):
    meta = metadata(INFO, enable_bucket=True, bucket_no_upscale=no_upscale, min_bucket_reso=64,
                    max_bucket_reso=128)
    assert (meta["ss_enable_bucket"], meta["ss_bucket_no_upscale"]) == ("True", str(no_upscale))
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("64", "128")
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"]["count"] == 3
