"""The benchmark scripts' own logic: the HunyuanVideo benchmark DiT has the released widths in the layout users
have, the extrapolated row follows its stated rule, and the bare LoRA step trains a HunyuanVideo DiT."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_load_memory  # noqa: E402
import bench_train_overhead  # noqa: E402
from _bench_models import bench_dit, write_random_checkpoint  # noqa: E402

from musubi_tuner.architectures.hunyuan_video.dit_files import infer_hv_config  # noqa: E402


def test_hv_bench_dit_has_released_widths_and_the_requested_blocks():
    spec = bench_dit("hunyuan_video", (1, 2))
    config = infer_hv_config(spec.original_shapes())
    assert (config["num_layers"], config["num_single_layers"], config["num_refiner_layers"]) == (1, 2, 2)
    assert (config["num_attention_heads"], config["attention_head_dim"], config["mlp_ratio"]) == (24, 128, 4.0)
    assert (config["text_embed_dim"], config["pooled_projection_dim"]) == (4096, 768)
    assert (config["in_channels"], config["out_channels"], config["guidance_embeds"]) == (16, 16, True)
    assert spec.key_prefix == "model.diffusion_model."  # ComfyUI's repackaged layout


def test_random_checkpoint_is_bf16_under_the_prefix_and_seeded(tmp_path):
    from safetensors.torch import load_file

    shapes = {"img_in.proj.weight": (4, 3), "final_layer.linear.bias": (5,)}
    write_random_checkpoint(shapes, tmp_path / "a.safetensors", prefix="model.diffusion_model.", seed=3)
    write_random_checkpoint(shapes, tmp_path / "b.safetensors", prefix="model.diffusion_model.", seed=3)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert {k: tuple(v.shape) for k, v in a.items()} == {"model.diffusion_model." + k: v for k, v in shapes.items()}
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extrapolation_takes_exact_weights_and_scales_the_rest_by_weight_bytes():
    measured = {"mode": "bf16", "params_m": 1000.0, "fp8_params_m": 0.0, "load_s": 2.0, "cast_s": 1.0,
                "param_mib": 2000.0, "rss_before_mib": 300.0, "rss_loaded_mib": 400.0, "rss_after_mib": 2300.0,
                "rss_after_anon_mib": 350.0, "peak_rss_mib": 2500.0}
    released = {"params_m": 4000.0, "fp8_params_m": 3000.0, "param_mib": 8000.0}
    est = bench_load_memory.extrapolate(measured, released)
    assert (est["params_m"], est["fp8_params_m"], est["param_mib"]) == (4000.0, 3000.0, 8000.0)
    assert (est["load_s"], est["cast_s"]) == (8.0, 4.0)
    assert (est["rss_before_mib"], est["rss_loaded_mib"], est["rss_after_mib"]) == (300.0, 700.0, 8300.0)
    assert (est["rss_after_anon_mib"], est["peak_rss_mib"]) == (500.0, 9100.0)
    assert "cuda_peak_mib" not in est


def test_released_hv_weights_are_counted_exactly_with_every_linear_in_fp8():
    from torch import nn

    spec = bench_dit("hunyuan_video", (1, 1))
    bf16, fp8 = (bench_load_memory.released_weights(spec, mode) for mode in ("bf16", "fp8_base"))
    assert bf16["params_m"] * 1e6 == 12_821_012_544 and bf16["fp8_params_m"] == 0
    assert bf16["param_mib"] == 12_821_012_544 * 2 / 2**20
    # fp8, the reference's rule: every Linear weight (it casts the whole DiT); biases, norms and the patch-embedding
    # convolution stay bf16
    linear_weights = sum(m.weight.numel() for m in spec.released_meta_model().modules() if type(m) is nn.Linear)
    assert fp8["fp8_params_m"] * 1e6 == linear_weights
    assert 12_81e7 < linear_weights < bf16["params_m"] * 1e6  # 12.81 B of 12.82 B
    assert fp8["param_mib"] == (bf16["params_m"] * 1e6 * 2 - fp8["fp8_params_m"] * 1e6) / 2**20
    assert round(fp8["param_mib"] / 1024, 2) == 11.94  # the reference's ~11.9 GiB


def test_hv_train_bench_runs_the_trainer_unless_bare_only():
    args = bench_train_overhead.parse_args(["--arch", "hunyuan_video"])
    assert (args.bare_only, args.hv_blocks) == (False, [1, 2])
    with pytest.raises(SystemExit):  # the LLM cache holds 256 tokens
        bench_train_overhead.parse_args(["--arch", "hunyuan_video", "--text_tokens", "257"])


def tiny_hv_run(tmp_path, *extra: str):
    """(args, DitFile) for a tiny HunyuanVideo DiT (the released-width file is for benchmark runs only)."""
    from musubi_tuner.architectures.hunyuan_video.tiny import TINY_POOLED_DIM, TINY_TEXT_DIM, write_tiny_hv_dit

    args = bench_train_overhead.parse_args(["--arch", "hunyuan_video", "--size", "32", "--frames", "5", "--items",
                                            "2", "--text_tokens", "4", "--network_dim", "4", "--mixed_precision",
                                            "no", *extra])
    dit = bench_train_overhead.DitFile(write_tiny_hv_dit(tmp_path, layout="comfy"), "tiny HunyuanVideo",
                                       (TINY_TEXT_DIM, TINY_POOLED_DIM))
    return args, dit


def test_hv_trainer_and_bare_loops_both_run_on_the_same_caches(tmp_path):
    from safetensors import safe_open

    args, dit = tiny_hv_run(tmp_path, "--warmup", "0", "--steps", "1")
    result = bench_train_overhead.measure(args, tmp_path, dit)
    assert result["trainer_s"] > 0 and result["bare_s"] > 0
    assert result["ratio"] == result["trainer_s"] / result["bare_s"]
    with safe_open(tmp_path / "out" / "bench.safetensors", "pt") as f:  # the HV trainer trained and saved
        keys = set(f.keys())
        assert f.metadata()["ss_network_module"] == "networks.lora"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys
    assert not any("_mod_" in k or "modulation" in k for k in keys)
    llm = next((tmp_path / "data" / "cache").glob("*_hv_te.safetensors"))
    with safe_open(llm, "pt") as f:  # the caches the HV text caching script writes: 256 LLM tokens, 4 valid
        assert tuple(f.get_slice("llm_bfloat16").get_shape()) == (256, 32)
        assert f.get_tensor("llm_mask").sum() == 4


@pytest.mark.parametrize("fp8_base", [False, True])
def test_bare_lora_step_trains_a_hunyuan_video_dit(tmp_path, fp8_base):
    args, dit_file = tiny_hv_run(tmp_path, *(["--fp8_base"] if fp8_base else []))
    toml = bench_train_overhead.write_dataset(tmp_path / "data", args, dit_file)
    argv = bench_train_overhead.training_argv(dit_file.path, toml, tmp_path / "out", args, 2)
    dit, latents, forward = bench_train_overhead.bare_inputs("hunyuan_video", argv, toml, args)
    assert tuple(latents.shape) == (1, 16, 2, 4, 4)
    network = bench_train_overhead.attach_lora("hunyuan_video", dit, args)
    frozen = {n: p.detach().clone() for n, p in dit.state_dict().items()}
    ups = {k: v.clone() for k, v in network.state_dict().items() if "lora_up" in k}
    assert ups and all(not v.any() for v in ups.values())  # LoRA up starts at zero
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in ups)
    assert not any("_mod_" in k or "modulation" in k for k in ups)  # the reference never targets modulation

    times = bench_train_overhead.run_bare(network, latents, forward, args, steps=2)
    assert len(times) == 2 and all(t > 0 for t in times)
    after = network.state_dict()
    assert all(after[k].abs().sum() > 0 for k in ups)  # AdamW moved every LoRA up matrix
    assert all(torch.equal(dit.state_dict()[n].float(), v.float()) for n, v in frozen.items())  # the DiT is frozen
    assert any(p.dtype == torch.float8_e4m3fn for p in dit.parameters()) == fp8_base
