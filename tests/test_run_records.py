"""What a training run leaves behind besides the LoRA weights: TensorBoard logs and the reference's `ss_*` metadata."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from safetensors import safe_open

from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_train_network
from musubi_tuner.dataset.config import load_dataset_config
from musubi_tuner.architectures import get_architecture
from musubi_tuner.networks.lora_metadata import dataset_metadata
from musubi_tuner.training.logging_utils import tracker_plan
from wan_fixtures import make_workspace, run


def test_logging_dir_alone_means_tensorboard_in_a_timestamped_run_folder():
    now = time.mktime((2025, 3, 4, 5, 6, 7, 0, 0, -1))
    assert tracker_plan("logs", None, None, now) == (["tensorboard"], str(Path("logs") / "20250304050607"))
    assert tracker_plan("logs", None, "wan-", now) == (["tensorboard"], str(Path("logs") / "wan-20250304050607"))
    assert tracker_plan("logs", "all", None, now)[0] == ["tensorboard", "wandb"]
    assert tracker_plan("logs", "wandb", None, now)[0] == ["wandb"]
    assert tracker_plan(None, None, "x", now) == (None, None)  # nothing asked, nothing logged


def test_dataset_metadata_as_the_reference_records_it(tmp_path):
    ws = make_workspace(tmp_path)
    image, video = load_dataset_config(ws.toml, get_architecture("wan").traits)
    assert dataset_metadata(image) == {
        "resolution": [32, 32], "caption_extension": ".txt", "batch_size_per_device": 1, "num_repeats": 1,
        "enable_bucket": True, "bucket_no_upscale": False, "image_directory": "images", "has_control": False,
    }
    meta = dataset_metadata(video)
    assert meta["video_directory"] == "videos" and "image_directory" not in meta
    assert (meta["frame_extraction"], meta["target_frames"], meta["max_frames"], meta["source_fps"]) == ("head", [5], 129, None)


def test_a_run_logs_to_tensorboard_and_records_data_and_optimizer(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args, "--device", "cpu"]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(ws.toml), *ws.t5_args, "--device", "cpu"]) == 0
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = ws.train_args(out, 2, "--logging_dir", str(logs), "--log_prefix", "wan-", "--optimizer_args", "weight_decay=0.1")
    assert run(wan_train_network.main, args) == 0

    runs = list(logs.iterdir())
    assert len(runs) == 1 and re.fullmatch(r"wan-\d{14}", runs[0].name)
    assert list((runs[0] / "network_train").glob("events.out.tfevents.*"))

    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    datasets = json.loads(meta["ss_datasets"])
    assert [d.get("image_directory", d.get("video_directory")) for d in datasets] == ["images", "videos"]
    # 2 images + 1 clip, 1 repeat each, batch size 1 -> 3 items and 3 batches; 2 steps fit in one epoch
    assert (meta["ss_num_train_items"], meta["ss_num_batches_per_epoch"], meta["ss_num_epochs"]) == ("3", "3", "1")
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    assert (meta["ss_full_fp16"], meta["ss_full_bf16"]) == ("False", "False")
