"""--split_attn, --gradient_checkpointing_cpu_offload and --fp8_fast against the plain path on CPU."""

import pytest
import torch

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.wan.tiny import make_tiny_dit
from musubi_tuner.errors import UserError
from musubi_tuner.memory.attention import SplitAttentionProcessor, apply_split_attention


def _wan_batch(n=3):
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(n, 16, 2, 8, 8, generator=gen), timestep=torch.tensor([500.0, 20.0, 900.0][:n]),
                encoder_hidden_states=torch.randn(n, 12, 32, generator=gen), return_dict=False)


def test_split_attention_gives_the_batched_outputs_and_calls_attention_once_per_item():
    plain, split = make_tiny_dit(), make_tiny_dit()
    assert apply_split_attention(split) == 4  # 2 blocks x (self + cross attention)
    calls = []
    processor = split.blocks[0].attn1.processor
    original = processor.inner
    processor.inner = lambda attn, **kw: (calls.append(kw["hidden_states"].shape[0]), original(attn, **kw))[1]
    with torch.no_grad():
        expected, got = plain(**_wan_batch())[0], split(**_wan_batch())[0]
    assert calls == [1, 1, 1]
    assert torch.equal(got, expected)


def test_split_attention_handles_joint_attention_and_masks():
    from musubi_tuner.architectures.flux_kontext.tiny import tiny_flux_dit
    from musubi_tuner.architectures.flux_kontext.packing import pack_latents, prepare_image_ids, prepare_text_ids

    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=pack_latents(torch.randn(2, 16, 4, 6, generator=gen)),
                  encoder_hidden_states=torch.randn(2, 5, 32, generator=gen),
                  pooled_projections=torch.randn(2, 32, generator=gen), timestep=torch.tensor([0.7, 0.2]),
                  img_ids=prepare_image_ids(2, 3, index=0), txt_ids=prepare_text_ids(5),
                  guidance=torch.tensor([2.5, 2.5]), return_dict=False)
    plain, split = tiny_flux_dit(), tiny_flux_dit()
    apply_split_attention(split)
    with torch.no_grad():
        # per item the same math; the projections' GEMM blocks rows differently for 1 vs 2 items (last-bit changes)
        torch.testing.assert_close(split(**inputs)[0], plain(**inputs)[0], rtol=0, atol=1e-6)


def test_split_attention_passes_every_argument_the_wrapped_processor_takes():
    """diffusers hands a processor only the kwargs its __call__ names; HunyuanVideo's rotary embedding (and its
    text mask) must reach the wrapped processor, or the split model silently computes something else."""
    from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_dit

    plain, split = tiny_hv_dit(seed=0).float(), tiny_hv_dit(seed=0).float()
    apply_split_attention(split)
    gen = torch.Generator().manual_seed(2)
    cfg = plain.config
    inputs = dict(hidden_states=torch.randn(2, cfg.in_channels, 1, 4, 4, generator=gen),
                  timestep=torch.tensor([500.0, 300.0]),
                  encoder_hidden_states=torch.randn(2, 6, cfg.text_embed_dim, generator=gen),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
                  pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=gen),
                  guidance=torch.tensor([6000.0, 6000.0]), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(split(**inputs)[0], plain(**inputs)[0], rtol=0, atol=1e-5)


def test_split_attention_keeps_gradients():
    grads = []
    for split in (False, True):
        model = make_tiny_dit()
        if split:
            apply_split_attention(model)
        x = _wan_batch(2)["hidden_states"].requires_grad_(True)
        model(**{**_wan_batch(2), "hidden_states": x})[0].square().mean().backward()
        grads.append(x.grad)
    assert torch.equal(grads[1], grads[0])


def test_split_attention_wraps_once_and_keeps_the_backend():
    model = make_tiny_dit()
    apply_split_attention(model)
    apply_split_attention(model)
    processor = model.blocks[0].attn1.processor
    assert isinstance(processor, SplitAttentionProcessor) and not isinstance(processor.inner, SplitAttentionProcessor)
    assert processor._attention_backend == processor.inner._attention_backend


def test_split_attention_on_a_model_without_attention_names_the_flag():
    with pytest.raises(UserError, match="--split_attn: Linear has no attention processors"):
        apply_split_attention(torch.nn.Linear(2, 2))


# ---- --gradient_checkpointing_cpu_offload ------------------------------------------------------------------------


def test_cpu_offloaded_checkpointing_gives_the_same_gradients(monkeypatch):
    from musubi_tuner.memory import activation_offload

    calls = []
    original = activation_offload.checkpoint

    def spy(function, *held, **kwargs):
        calls.append([h.device.type for h in held if torch.is_tensor(h)])
        return original(function, *held, **kwargs)

    monkeypatch.setattr(activation_offload, "checkpoint", spy)
    results = []
    for offload in (None, activation_offload.checkpoint_with_cpu_offload):
        model = make_tiny_dit()
        model.enable_gradient_checkpointing(offload)
        model.train()
        x = _wan_batch(2)["hidden_states"].requires_grad_(True)
        model(**{**_wan_batch(2), "hidden_states": x})[0].square().mean().backward()
        results.append([x.grad] + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(calls) == 2 and all(set(devices) == {"cpu"} for devices in calls)  # one per block, inputs held on CPU
    assert len(results[0]) == len(results[1]) and all(torch.equal(a, b) for a, b in zip(*results))


# ---- --fp8_fast ---------------------------------------------------------------------------------------------------


def _fp8_dit():
    from musubi_tuner.memory.fp8 import store_dit_in_fp8

    model = make_tiny_dit()
    store_dit_in_fp8(model, get_architecture("wan"), scaled=False)
    return model


def test_fp8_fast_falls_back_with_a_warning_and_the_plain_numbers_on_cpu(caplog):
    from musubi_tuner.memory.fp8_fast import Fp8FastLinear, enable_fp8_fast

    plain, fast = _fp8_dit(), _fp8_dit()
    with caplog.at_level("WARNING", logger="musubi_tuner"):
        assert enable_fp8_fast(fast, torch.device("cpu")) == 0
    assert "--fp8_fast: fp8 matmuls need a CUDA GPU with compute capability 8.9" in caplog.text
    assert not any(isinstance(m, Fp8FastLinear) for m in fast.modules())
    with torch.no_grad():
        assert torch.equal(fast(**_wan_batch(1))[0], plain(**_wan_batch(1))[0])


def test_the_emulation_matches_torch_scaled_mm():
    from musubi_tuner.memory.fp8_fast import emulated_scaled_mm

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(32, 64, generator=gen).to(torch.float8_e5m2)
    b = torch.randn(48, 64, generator=gen).to(torch.float8_e4m3fn).t()
    scale_a, scale_b, bias = torch.tensor(0.5), torch.tensor(2.0), torch.randn(48, generator=gen)
    try:
        real = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        pytest.skip("this torch build has no CPU _scaled_mm")
    torch.testing.assert_close(emulated_scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias,
                                                  out_dtype=torch.float32), real, rtol=1e-6, atol=1e-5)


FP8_FAST_TOLERANCE = 0.05
"""Relative L2 error of the DiT output, fp8_fast (e5m2 activations) vs plain fp8 (bf16/fp32 activations): e5m2 rounds
each activation by up to 2^-3 (about 4% RMS); measured 2.6% on the tiny Wan DiT, so 5% leaves room, not slack."""


def test_fp8_fast_scaling_math_stays_within_the_stated_tolerance_of_the_plain_fp8_path():
    from musubi_tuner.memory.fp8_fast import Fp8FastLinear, emulated_scaled_mm, enable_fp8_fast

    plain, fast = _fp8_dit(), _fp8_dit()
    used = []
    count = enable_fp8_fast(fast, torch.device("cpu"),
                            matmul=lambda *a, **kw: (used.append(1), emulated_scaled_mm(*a, **kw))[1])
    assert count == sum(isinstance(m, Fp8FastLinear) for m in fast.modules()) > 0
    with torch.no_grad():
        expected, got = plain(**_wan_batch(1))[0], fast(**_wan_batch(1))[0]
    assert used  # the fp8 matmul ran (32 tokens and widths are multiples of 16)
    error = ((got - expected).norm() / expected.norm()).item()
    assert 0 < error < FP8_FAST_TOLERANCE


def test_fp8_fast_keeps_the_plain_path_for_shapes_scaled_mm_cannot_take():
    from musubi_tuner.memory.fp8 import cast_linear_weights_to_fp8
    from musubi_tuner.memory.fp8_fast import enable_fp8_fast

    layer = torch.nn.Linear(32, 24)  # 24 outputs: not a multiple of 16
    cast_linear_weights_to_fp8(layer)
    x = torch.randn(16, 32)
    expected = layer(x)
    enable_fp8_fast(layer, torch.device("cpu"), matmul=lambda *a, **kw: pytest.fail("must not be called"))
    assert torch.equal(layer(x), expected)


def test_generate_refuses_fp8_fast_without_fp8():
    from musubi_tuner.inference.generate_cli import generate_main

    with pytest.raises(UserError, match="--fp8_fast needs --fp8"):
        generate_main("wan", ["--task", "t2v-1.3B", "--fp8_fast", "--save_path", "o", "--prompt", "x"])


def test_training_cli_applies_split_attention_and_offloaded_checkpointing(monkeypatch, tmp_path):
    from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_train_network
    from musubi_tuner.memory import activation_offload, attention
    from wan_fixtures import make_workspace, run

    ws = make_workspace(tmp_path)
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(ws.toml), *ws.t5_args]) == 0
    calls = {"split": 0, "offload": 0}
    split_call, offload = attention.SplitAttentionProcessor.__call__, activation_offload.checkpoint_with_cpu_offload

    def counted_split(self, *a, **kw):
        calls["split"] += 1
        return split_call(self, *a, **kw)

    def counted_offload(*a):
        calls["offload"] += 1
        return offload(*a)

    monkeypatch.setattr(attention.SplitAttentionProcessor, "__call__", counted_split)
    monkeypatch.setattr(activation_offload, "checkpoint_with_cpu_offload", counted_offload)
    args = ws.train_args(tmp_path / "o", 1, "--gradient_checkpointing", "--gradient_checkpointing_cpu_offload",
                         "--split_attn", "--sdpa")
    assert run(wan_train_network.main, args) == 0
    assert calls["offload"] == 2  # one step, two blocks
    assert calls["split"] == 2 * 2 * 2  # (forward + recompute) x two blocks x (self + cross attention)


def test_generation_cli_with_every_memory_switch_renders_the_plain_latents(tmp_path, caplog):
    from safetensors.torch import load_file

    from musubi_tuner import wan_generate_video
    from wan_fixtures import make_workspace, run

    ws = make_workspace(tmp_path)

    def generate(folder, *extra):
        argv = ["--task", "t2v-1.3B", "--dit", str(ws.dit), *ws.vae_args, *ws.t5_args, "--prompt", "a blue square",
                "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "3", "--seed", "1",
                "--save_path", str(folder), "--output_type", "latent", "--device", "cpu", "--fp8", *extra]
        assert run(wan_generate_video.main, argv) == 0
        (latent,) = folder.glob("*_latent.safetensors")
        return load_file(str(latent))["latent"]

    plain = generate(tmp_path / "plain")
    with caplog.at_level("WARNING", logger="musubi_tuner"):
        switched = generate(tmp_path / "switched", "--fp8_fast", "--split_attn", "--blocks_to_swap", "1",
                            "--use_pinned_memory_for_block_swap")
    assert "--fp8_fast: fp8 matmuls need a CUDA GPU" in caplog.text  # CPU: the documented fallback
    assert torch.equal(plain, switched)
