"""Wan end to end through the command-line entry points, on tiny model files in the real layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner import merge_lora, wan_cache_latents, wan_generate_video, wan_train_network
from wan_fixtures import make_cached_workspace, run




@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_cached_workspace(tmp_path_factory.mktemp("wan"))


def test_cache_files_follow_the_reference_names_and_keys(ws):
    img = sorted(p.name for p in (ws.root / "data" / "cache_img").iterdir())
    vid = sorted(p.name for p in (ws.root / "data" / "cache_vid").iterdir())
    assert img == ["green_dot_0032x0032_wan.safetensors", "green_dot_wan_te.safetensors",
                   "red_dot_0032x0032_wan.safetensors", "red_dot_wan_te.safetensors"]
    assert vid == ["blue_square_00000-005_0032x0032_wan.safetensors", "blue_square_wan_te.safetensors"]
    with safe_open(str(ws.root / "data" / "cache_vid" / vid[0]), "pt") as f:
        assert list(f.keys()) == ["latents_2x4x4_float32"]
        assert f.metadata()["architecture"] == "wan"
        assert f.metadata()["frame_count"] == "5"
    with safe_open(str(ws.root / "data" / "cache_vid" / vid[1]), "pt") as f:
        (key,) = f.keys()
        assert key.startswith("varlen_t5_") and f.get_tensor(key).shape[1] == 32
        assert f.metadata()["caption1"] == "a blue square moving"


def test_skip_existing_is_incremental_and_stale_caches_go(ws, capsys):
    stale = ws.root / "data" / "cache_img" / "gone_0032x0032_wan.safetensors"
    stale.write_bytes(b"x")
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args, "--skip_existing"]) == 0
    out = capsys.readouterr().out
    assert "0 written, 3 already cached (skipped), 1 stale removed" in out
    assert not stale.exists()


def test_config_with_zero_items_fails_before_any_model_loads(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nresolution = [32, 32]\n[[datasets]]\nimage_directory = "{empty.as_posix()}"\n')
    code = run(wan_cache_latents.main, ["--dataset_config", str(toml), "--vae", str(tmp_path / "missing_vae.pth")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no items" in err.lower() or "zero" in err.lower() or "0 items" in err.lower()
    assert "missing_vae" not in err  # the VAE was never touched


def _eval_loss(dit_path, lora_path, cache_dir) -> float:
    """Flow-matching loss of DiT(+LoRA) on the cached clip at fixed timesteps and noise."""
    from musubi_tuner.architectures.wan import WanArchitecture
    from musubi_tuner.architectures.wan.dit_files import load_wan_dit
    from musubi_tuner.dataset.cache_files import read_cache
    from musubi_tuner.inference.lora_merge import merge_loras_into_dit

    arch = WanArchitecture()
    dit = load_wan_dit(dit_path, dtype=torch.float32)
    if lora_path is not None:
        merge_loras_into_dit(arch, dit, [str(lora_path)], [1.0])
    latents, _ = read_cache(next(cache_dir.glob("*_0032x0032_wan.safetensors")))
    text, _ = read_cache(next(cache_dir.glob("*_te.safetensors")))
    x0 = latents["latents"][None].float()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for t in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(x0.shape, generator=gen)
        noisy = (1 - t) * x0 + t * noise
        with torch.no_grad():
            pred = arch.predict(dit, {"t5": [text["t5"]]}, noisy, torch.tensor([t * 1000.0]))
        losses.append(torch.mean((pred - (noise - x0)) ** 2).item())
    return sum(losses) / len(losses)


def test_training_overfits_one_clip_and_writes_reference_files(ws, tmp_path):
    # only the video dataset: overfit one clip
    toml = tmp_path / "clip.toml"
    text = ws.toml.read_text()
    toml.write_text(text[:text.index("[[datasets]]")] + text[text.index("[[datasets]]", text.index("[[datasets]]") + 1):])
    out = tmp_path / "out"
    args = ws.train_args(out, 40, "--save_every_n_steps", "20", "--learning_rate", "5e-3", "--network_dim", "8",
                         "--network_alpha", "8")
    args[args.index("--dataset_config") + 1] = str(toml)
    assert run(wan_train_network.main, args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["lora-step00000020.safetensors", "lora.safetensors"]
    sd = load_file(str(out / "lora.safetensors"))
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in sd and "lora_unet_blocks_1_ffn_2.alpha" in sd
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora_wan" and meta["modelspec.architecture"].startswith("wan2.1")
    assert "sshs_model_hash" in meta
    cache_dir = ws.root / "data" / "cache_vid"
    before = _eval_loss(ws.dit, None, cache_dir)
    after = _eval_loss(ws.dit, out / "lora.safetensors", cache_dir)
    assert after < 0.8 * before, (before, after)


def test_resumed_run_gives_the_same_lora_as_an_uninterrupted_one(ws, tmp_path):
    # 3 batches per epoch, accumulation 2 -> 2 steps per epoch; the state at step 3 sits mid-epoch 2.
    extra = ["--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
             "--network_dropout", "0.1", "--timestep_sampling", "logsnr", "--save_every_n_steps", "3", "--save_state"]
    full = tmp_path / "full"
    assert run(wan_train_network.main, ws.train_args(full, 6, *extra)) == 0
    state = full / "lora-step00000003-state"
    assert (state / "musubi_state.json").exists()
    resumed = tmp_path / "resumed"
    assert run(wan_train_network.main, ws.train_args(resumed, 6, *extra, "--resume", str(state))) == 0
    a, b = load_file(str(full / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with safe_open(str(resumed / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"


def test_resume_refuses_an_incomplete_state(ws, tmp_path, capsys):
    broken = tmp_path / "lora-step00000003-state"
    broken.mkdir()
    (broken / "network.safetensors").write_bytes(b"")
    code = run(wan_train_network.main, ws.train_args(tmp_path / "o", 2, "--resume", str(broken)))
    assert code == 2
    assert "incomplete state" in capsys.readouterr().err


def test_nan_loss_stops_with_a_clear_message_and_keeps_saved_files(ws, tmp_path, capsys):
    out = tmp_path / "nan"
    args = ws.train_args(out, 30, "--save_every_n_steps", "1", "--learning_rate", "1e30", "--max_grad_norm", "0")
    code = run(wan_train_network.main, args)
    assert code == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err.lower() or "loss is inf" in err.lower()
    saved = sorted(out.glob("lora-step*.safetensors"))
    assert saved and "lora.safetensors" not in [p.name for p in out.iterdir()]
    load_file(str(saved[-1]))  # the last saved LoRA is intact


def test_generation_is_reproducible_by_seed_and_merge_matches(ws, tmp_path):
    out = tmp_path / "train"
    assert run(wan_train_network.main, ws.train_args(out, 3)) == 0
    lora = out / "lora.safetensors"

    def generate(seed: int, folder):
        argv = ["--task", "t2v-1.3B", "--dit", str(ws.dit), *ws.vae_args, *ws.t5_args, "--lora_weight", str(lora),
                "--prompt", "a blue square", "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "4",
                "--seed", str(seed), "--save_path", str(folder), "--output_type", "both", "--device", "cpu"]
        assert run(wan_generate_video.main, argv) == 0
        (latent,) = folder.glob("*_latent.safetensors")
        assert len(list(folder.glob("*.mp4"))) == 1
        return load_file(str(latent))["latent"]

    a, b, c = generate(5, tmp_path / "a"), generate(5, tmp_path / "b"), generate(6, tmp_path / "c")
    assert torch.equal(a, b) and not torch.equal(a, c)

    merged = tmp_path / "merged.safetensors"
    assert run(merge_lora.main, ["--dit", str(ws.dit), "--lora_weight", str(lora), "--save_merged_model", str(merged)]) == 0
    base, lora_sd, m = load_file(str(ws.dit)), load_file(str(lora)), load_file(str(merged))
    down = lora_sd["lora_unet_blocks_0_self_attn_q.lora_down.weight"]
    up = lora_sd["lora_unet_blocks_0_self_attn_q.lora_up.weight"]
    scale = lora_sd["lora_unet_blocks_0_self_attn_q.alpha"].item() / down.shape[0]
    expected = base["blocks.0.self_attn.q.weight"] + scale * (up @ down)
    torch.testing.assert_close(m["blocks.0.self_attn.q.weight"], expected, rtol=0, atol=1e-6)


def test_resume_continues_the_loss_average_and_counters(ws, tmp_path):
    import json

    out = tmp_path / "o"
    assert run(wan_train_network.main, ws.train_args(out, 4, "--save_every_n_steps", "2", "--save_state")) == 0
    progress = json.loads((out / "lora-step00000002-state" / "musubi_state.json").read_text())
    assert progress["global_step"] == 2 and progress["epoch"] == 0 and progress["batch_in_epoch"] == 2
    assert len(progress["loss_window"]["values"]) == 2
    final = json.loads((out / "lora-state" / "musubi_state.json").read_text())  # --save_state also saves at the end
    assert final["global_step"] == 4 and len(final["loss_window"]["values"]) == 3  # one epoch = 3 batches


def test_generate_from_file_and_interactive(ws, tmp_path, monkeypatch):
    import io

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red dot --w 32 --h 32 --f 1 --s 2 --d 1\na blue square --w 32 --h 32 --f 5 --s 2 --d 2\n")
    base = ["--task", "t2v-1.3B", "--dit", str(ws.dit), *ws.vae_args, *ws.t5_args, "--save_path", str(tmp_path / "f"),
            "--output_type", "latent", "--guidance_scale", "1.0"]
    assert run(wan_generate_video.main, [*base, "--from_file", str(prompts)]) == 0
    shapes = sorted(tuple(load_file(str(p))["latent"].shape) for p in (tmp_path / "f").glob("*.safetensors"))
    assert shapes == [(16, 1, 4, 4), (16, 2, 4, 4)]

    monkeypatch.setattr("sys.stdin", io.StringIO("a green dot --w 32 --h 32 --f 1 --s 2 --d 9\n"))
    base[base.index("--save_path") + 1] = str(tmp_path / "i")
    assert run(wan_generate_video.main, [*base, "--interactive"]) == 0
    assert len(list((tmp_path / "i").glob("*_9_latent.safetensors"))) == 1


def test_resume_is_exact_with_timestep_buckets(ws, tmp_path):
    extra = ["--timestep_sampling", "sigmoid", "--num_timestep_buckets", "3", "--save_every_n_steps", "2", "--save_state"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run(wan_train_network.main, ws.train_args(full, 5, *extra)) == 0
    assert run(wan_train_network.main, ws.train_args(resumed, 5, *extra, "--resume", str(full / "lora-step00000002-state"))) == 0
    a, b = load_file(str(full / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scale_weight_norms_bounds_every_module(ws, tmp_path):
    out = tmp_path / "o"
    args = ws.train_args(out, 4, "--scale_weight_norms", "0.01", "--learning_rate", "1e-2")
    assert run(wan_train_network.main, args) == 0
    sd = load_file(str(out / "lora.safetensors"))
    for key in [k for k in sd if k.endswith("lora_down.weight")]:
        stem = key[: -len(".lora_down.weight")]
        delta = sd[f"{stem}.lora_up.weight"].float() @ sd[key].float() * (sd[f"{stem}.alpha"].item() / sd[key].shape[0])
        assert delta.norm() <= 0.01 * 1.001, stem


def test_base_weights_are_merged_before_training(ws, tmp_path):
    first = tmp_path / "first"
    assert run(wan_train_network.main, ws.train_args(first, 2)) == 0
    second = tmp_path / "second"
    args = ws.train_args(second, 1, "--base_weights", str(first / "lora.safetensors"), "--base_weights_multiplier", "1.0",
                         "--sdpa")
    assert run(wan_train_network.main, args) == 0
    assert (second / "lora.safetensors").exists()


def test_unavailable_attention_backend_is_a_clear_error(ws, tmp_path, capsys):
    assert run(wan_train_network.main, ws.train_args(tmp_path, 1, "--xformers")) == 2
    assert "xformers" in capsys.readouterr().err


def test_fp8_base_and_fp8_scaled_train(ws, tmp_path):
    for extra in (["--fp8_base"], ["--fp8_base", "--fp8_scaled"]):
        out = tmp_path / "_".join(extra)
        assert run(wan_train_network.main, ws.train_args(out, 2, *extra)) == 0
        sd = load_file(str(out / "lora.safetensors"))
        assert all(torch.isfinite(v).all() for v in sd.values())
        assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith("lora_up.weight"))


def test_block_swap_training_matches_training_without_it(ws, tmp_path):
    plain, swapped = tmp_path / "plain", tmp_path / "swapped"
    assert run(wan_train_network.main, ws.train_args(plain, 2, "--gradient_checkpointing")) == 0
    assert run(wan_train_network.main, ws.train_args(swapped, 2, "--gradient_checkpointing", "--blocks_to_swap", "1")) == 0
    a, b = load_file(str(plain / "lora.safetensors")), load_file(str(swapped / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_last_n_prunes_old_checkpoints_and_states(ws, tmp_path):
    out = tmp_path / "o"
    args = ws.train_args(out, 7, "--save_every_n_steps", "2", "--save_last_n_steps", "4", "--save_state",
                         "--max_train_epochs", "3", "--save_every_n_epochs", "1", "--save_last_n_epochs", "1")
    assert run(wan_train_network.main, args) == 0
    names = sorted(p.name for p in out.iterdir())
    # 3 epochs x 3 steps = 9 steps; step saves at 2,4,6,8: at step 8 a window of 4 steps keeps 4..8 (the
    # reference's rule); epoch saves at 1,2 (the last epoch writes the final file) keep the last one
    assert names == ["lora-000002-state", "lora-000002.safetensors", "lora-state",
                     "lora-step00000004-state", "lora-step00000004.safetensors", "lora-step00000006-state", "lora-step00000006.safetensors",
                     "lora-step00000008-state", "lora-step00000008.safetensors", "lora.safetensors"], names


def test_skip_existing_re_encodes_caches_that_no_longer_fit(ws, tmp_path, capsys):
    # a changed resolution keeps the cache names (they carry the original size) but not the latent size
    toml = tmp_path / "bigger.toml"
    toml.write_text(ws.toml.read_text().replace("resolution = [32, 32]", "resolution = [48, 48]"))
    args = ["--dataset_config", str(toml), *ws.vae_args, "--skip_existing"]
    assert run(wan_cache_latents.main, args) == 0
    assert "3 written, 0 already cached" in capsys.readouterr().out
    with safe_open(str(ws.root / "data" / "cache_vid" / "blue_square_00000-005_0032x0032_wan.safetensors"), "pt") as f:
        assert list(f.keys()) == ["latents_2x6x6_float32"]
    assert run(wan_cache_latents.main, args) == 0
    assert "0 written, 3 already cached" in capsys.readouterr().out
    # back to the fixture's resolution for the other tests
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args, "--skip_existing"]) == 0


def test_resume_auto_picks_the_newest_complete_state(ws, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="musubi_tuner")
    out = tmp_path / "o"
    extra = ["--save_every_n_steps", "2", "--save_state"]
    assert run(wan_train_network.main, ws.train_args(out, 5, *extra)) == 0
    straight = load_file(str(out / "lora.safetensors"))
    # states at steps 2 and 4; drop the final one and fake an interrupted save at 6: auto must pick step 4
    import shutil

    shutil.rmtree(out / "lora-state")
    (out / "lora-step00000006-state").mkdir()
    (out / "lora.safetensors").unlink()
    caplog.clear()
    assert run(wan_train_network.main, ws.train_args(out, 5, *extra, "--resume", "auto")) == 0
    assert "lora-step00000004-state at step 4" in caplog.text
    assert all(torch.equal(straight[k], v) for k, v in load_file(str(out / "lora.safetensors")).items())
    fresh = tmp_path / "fresh"  # nothing to resume: starts at step 0
    assert run(wan_train_network.main, ws.train_args(fresh, 1, "--resume", "auto")) == 0


def test_a_non_finite_cache_stops_training_naming_the_file_not_the_learning_rate(ws, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    caches = {}
    for name in ("cache_img", "cache_vid"):
        caches[name] = shutil.copytree(ws.root / "data" / name, tmp_path / name)
    (bad,) = caches["cache_vid"].glob("*_wan.safetensors")
    with safe_open(str(bad), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = next(iter(tensors))
    tensors[key][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(bad), metadata=meta)  # a foreign writer: ours zeroes NaN on the way in
    toml = tmp_path / "ds.toml"
    toml.write_text(ws.toml.read_text().replace((ws.root / "data" / "cache_img").as_posix(), caches["cache_img"].as_posix())
                    .replace((ws.root / "data" / "cache_vid").as_posix(), caches["cache_vid"].as_posix()))
    args = ws.train_args(tmp_path / "out", 3)
    args[args.index("--dataset_config") + 1] = str(toml)
    assert run(wan_train_network.main, args) == 2
    err = capsys.readouterr().err
    assert f"{bad} (latents)" in err and "re-cache" in err and "--learning_rate" not in err


def test_a_lora_with_nan_is_refused_by_generation_and_merge(ws, tmp_path, capsys):
    from safetensors.torch import save_file

    lora = tmp_path / "broken.safetensors"
    down = torch.zeros(4, 32)
    down[1, 2] = float("nan")
    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": down,
               "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)}, str(lora))
    gen = ["--task", "t2v-1.3B", "--dit", str(ws.dit), *ws.vae_args, *ws.t5_args, "--lora_weight", str(lora),
           "--prompt", "a blue square", "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2",
           "--save_path", str(tmp_path / "out"), "--device", "cpu"]
    assert run(wan_generate_video.main, gen) == 2
    err = capsys.readouterr().err
    assert f"--lora_weight {lora}: tensor lora_unet_blocks_0_self_attn_q.lora_down.weight holds NaN/Inf" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    merged = tmp_path / "merged.safetensors"
    assert run(merge_lora.main, ["--dit", str(ws.dit), "--lora_weight", str(lora), "--save_merged_model", str(merged)]) == 2
    assert "lora_down.weight holds NaN/Inf" in capsys.readouterr().err
    assert not merged.exists()
