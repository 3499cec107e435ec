"""Every flag and prompt line is checked before any model loads: one line naming the flag/line/option, exit 2."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from musubi_tuner import merge_lora, wan_cache_latents, wan_generate_video, wan_train_network
from wan_fixtures import run

MISSING = "/nonexistent/never_loaded.safetensors"  # any model load would fail naming this path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert MISSING not in err  # nothing was loaded
    return err


def _train_argv(tmp_path, *extra):
    return ["--task", "t2v-1.3B", "--dit", MISSING, "--vae", MISSING, "--t5", MISSING, "--dataset_config", MISSING,
            "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("flag,value", [
    ("--network_dim", "0"), ("--network_dim", "-4"), ("--learning_rate", "nan"), ("--learning_rate", "inf"),
    ("--max_train_steps", "0"), ("--seed", "-1"), ("--network_alpha", "-1"), ("--network_dropout", "1.5"),
    ("--logit_std", "0"), ("--sigmoid_scale", "0"), ("--max_grad_norm", "nan"), ("--lr_scheduler_min_lr_ratio", "2"),
    ("--blocks_to_swap", "-1"), ("--ddp_timeout", "0"), ("--compile_cache_size_limit", "0"),
])
def test_training_flag_out_of_range_is_one_line_naming_the_flag(tmp_path, capsys, flag, value):
    assert run(wan_train_network.main, _train_argv(tmp_path, flag, value)) == 2
    err = _error(capsys)
    assert err.startswith(f"error: argument {flag}:") and "\n" not in err  # one line, no usage dump


def test_config_file_values_get_the_same_range_checks(tmp_path, capsys):
    config = tmp_path / "cfg.toml"
    config.write_text("network_dim = 0\n")
    assert run(wan_train_network.main, _train_argv(tmp_path, "--config_file", str(config))) == 2
    err = _error(capsys)
    assert "cfg.toml: network_dim" in err and "--network_dim" in err and ">= 1" in err


@pytest.mark.parametrize("argv,expected", [
    (["--batch_size", "0"], "argument --batch_size: must be >= 1, got 0"),
    (["--num_workers", "-1"], "argument --num_workers: must be >= 1, got -1"),
    (["--device", "gpu0"], "argument --device: 'gpu0' is not a device"),
])
def test_caching_flags(capsys, argv, expected):
    assert run(wan_cache_latents.main, ["--dataset_config", MISSING, "--vae", MISSING, *argv]) == 2
    assert expected in _error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_up_front(capsys):
    assert run(wan_cache_latents.main, ["--dataset_config", MISSING, "--vae", MISSING, "--device", "cuda"]) == 2
    assert "argument --device: 'cuda': CUDA is not available here" in _error(capsys)


def _generate_argv(tmp_path, *extra):
    return ["--task", "t2v-1.3B", "--dit", MISSING, "--vae", MISSING, "--t5", MISSING,
            "--save_path", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("argv,expected", [
    (["--video_length", "0"], "argument --video_length: must be >= 1, got 0"),
    (["--video_size", "0", "64"], "argument --video_size: must be >= 1, got 0"),
    (["--video_size", "50", "64"], "--video_size: must be a positive multiple of 16, got 50"),
    (["--video_length", "6"], "--video_length: must be 4N+1 (1, 5, 9, ...), got 6"),
    (["--infer_steps", "0"], "argument --infer_steps: must be >= 1, got 0"),
    (["--guidance_scale", "nan"], "argument --guidance_scale: must be a finite number"),
    (["--trim_tail_frames", "-1"], "argument --trim_tail_frames: must be >= 0"),
    (["--video_length", "5", "--trim_tail_frames", "5"], "--trim_tail_frames 5 would remove all 5 frames"),
    (["--lora_multiplier", "nan"], "argument --lora_multiplier"),
])
def test_generate_flags(tmp_path, capsys, argv, expected):
    assert run(wan_generate_video.main, _generate_argv(tmp_path, "--prompt", "x", *argv)) == 2
    assert expected in _error(capsys)


@pytest.mark.parametrize("line,expected", [
    ("a dog --w 50 --h 64", "line 2: --w: must be a positive multiple of 16, got 50"),
    ("a dog --f 6", "line 2: --f: must be 4N+1"),
    ("a dog --s 0", "line 2: --s '0': must be >= 1"),
    ("a dog --i nowhere.png", "line 2: --i nowhere.png: file not found"),
])
def test_from_file_every_line_is_checked_before_loading(tmp_path, capsys, line, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat --w 32 --h 32 --f 5\n{line}\n")
    assert run(wan_generate_video.main, _generate_argv(tmp_path, "--from_file", str(prompts))) == 2
    err = _error(capsys)
    assert "prompts.txt " + expected in err and "--video_size" not in err


def test_inline_prompt_options_are_checked_too(tmp_path, capsys):
    assert run(wan_generate_video.main, _generate_argv(tmp_path, "--prompt", "a cat --h 40")) == 2
    assert "--prompt: --h: must be a positive multiple of 16, got 40" in _error(capsys)


def test_sample_prompts_are_checked_at_training_start(tmp_path, capsys):
    prompts = tmp_path / "samples.txt"
    prompts.write_text("a cat --w 64 --h 64\n# a comment\na dog --w 50\n")
    argv = _train_argv(tmp_path, "--sample_prompts", str(prompts), "--sample_every_n_steps", "10")
    assert run(wan_train_network.main, argv) == 2
    err = _error(capsys)
    assert "samples.txt line 3: --w: must be a positive multiple of 16, got 50" in err


def test_latent_path_refuses_a_lora_file(tmp_path, capsys):
    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)}, str(lora))
    assert run(wan_generate_video.main, _generate_argv(tmp_path, "--latent_path", str(lora))) == 2
    err = _error(capsys)
    assert "--latent_path" in err and "my_lora.safetensors" in err and "looks like a LoRA file" in err


def test_latent_path_accepts_a_saved_latent_header(tmp_path):
    from musubi_tuner.inference.generate_cli import check_latent_files

    latent = tmp_path / "x_latent.safetensors"
    save_file({"latent": torch.zeros(16, 2, 4, 4)}, str(latent))
    check_latent_files([str(latent)])


def test_merge_refuses_a_vae_as_dit(tmp_path, capsys):
    vae = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(4), "encoder.conv1.weight": torch.ones(1)}, str(vae))
    lora = tmp_path / "l.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(1.0)}, str(lora))
    out = tmp_path / "merged.safetensors"
    code = run(merge_lora.main, ["--dit", str(vae), "--lora_weight", str(lora), "--save_merged_model", str(out)])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--dit" in err and "looks like a Wan VAE" in err and "not a DiT" in err


def test_merge_refuses_a_lora_as_dit(tmp_path, capsys):
    lora = tmp_path / "l.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    code = run(merge_lora.main, ["--dit", str(lora), "--lora_weight", str(lora), "--save_merged_model",
                                 str(tmp_path / "m.safetensors")])
    assert code == 2 and "--dit" in capsys.readouterr().err


def test_trim_tail_frames_drops_the_last_decoded_frames():
    from musubi_tuner.inference.generate_cli import trim_tail_frames

    frames = torch.arange(5).view(5, 1, 1, 1).expand(5, 2, 2, 3)
    assert trim_tail_frames(frames, 0) is frames
    assert trim_tail_frames(frames, 2)[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_generate_compile_flags_reach_torch_compile(monkeypatch):
    from argparse import Namespace

    from musubi_tuner.memory.attention import compile_dit_from_flags

    seen = {}

    class Dit:
        def compile_repeated_blocks(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", torch._dynamo.config.cache_size_limit)
    compile_dit_from_flags(Dit(), Namespace(compile_backend="eager", compile_mode="max-autotune", compile_dynamic="true",
                                            compile_fullgraph=True, compile_cache_size_limit=77))
    assert seen == {"backend": "eager", "mode": "max-autotune", "dynamic": True, "fullgraph": True}
    assert torch._dynamo.config.cache_size_limit == 77


def test_generate_parses_the_reference_compile_and_memory_flags(caplog):
    import argparse

    from musubi_tuner.inference.generate_cli import NO_EFFECT, add_generation_arguments
    from musubi_tuner.utils.flag_types import warn_flags_without_effect

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    args = parser.parse_args(["--compile", "--compile_backend", "eager", "--compile_mode", "reduce-overhead",
                              "--compile_dynamic", "false", "--compile_fullgraph", "--compile_cache_size_limit", "8",
                              "--use_pinned_memory_for_block_swap", "--disable_numpy_memmap", "--lazy_loading"])
    assert (args.compile_backend, args.compile_mode, args.compile_dynamic, args.compile_cache_size_limit) == \
        ("eager", "reduce-overhead", "false", 8)
    with caplog.at_level("WARNING", logger="musubi_tuner"):
        warn_flags_without_effect(args, NO_EFFECT)
    for name in ("disable_numpy_memmap", "lazy_loading"):
        assert f"--{name} has no effect here" in caplog.text
    assert "use_pinned_memory_for_block_swap" not in caplog.text  # it picks the block swap's transfer mode


def test_debug_mode_video_writes_previews_without_the_vae(tmp_path, capsys):
    import av

    from wan_fixtures import write_clip_dataset

    toml = write_clip_dataset(tmp_path / "data")
    argv = ["--dataset_config", str(toml), "--vae", MISSING, "--debug_mode", "video"]
    assert run(wan_cache_latents.main, argv) == 0
    images = sorted(p.name for p in (tmp_path / "data" / "cache_img").iterdir())
    assert images == ["green_dot_0032x0032_wan.jpg", "red_dot_0032x0032_wan.jpg"]  # no cache written
    (video,) = (tmp_path / "data" / "cache_vid").iterdir()
    assert video.name == "blue_square_00000-005_0032x0032_wan.mp4"
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    assert MISSING not in capsys.readouterr().err


def test_debug_mode_console_prints_one_line_per_item(tmp_path, capsys):
    from wan_fixtures import write_clip_dataset

    toml = write_clip_dataset(tmp_path / "data")
    argv = ["--dataset_config", str(toml), "--debug_mode", "console", "--console_num_images", "1",
            "--console_width", "40", "--console_back", "black"]
    assert run(wan_cache_latents.main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    items = [line for line in lines if not line.startswith(("dataset [", "latent caches"))]
    assert len(items) == 2 and all(len(line) <= 40 for line in items)  # one item per dataset, cut to the width
    assert not list((tmp_path / "data").glob("cache_*/*"))  # console mode writes nothing


def test_disable_cudnn_backend(tmp_path, monkeypatch):
    from wan_fixtures import write_clip_dataset

    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    toml = write_clip_dataset(tmp_path / "data")
    argv = ["--dataset_config", str(toml), "--debug_mode", "console", "--disable_cudnn_backend"]
    assert run(wan_cache_latents.main, argv) == 0
    assert torch.backends.cudnn.enabled is False
