"""Wan2.2 A14B on two tiny experts: the switch at the boundary, per-expert guidance and LoRAs, training draws that
keep a step on one expert, the flags' checks, and per-expert LoRA files in ComfyUI and diffusers."""

from __future__ import annotations

import argparse

import pytest
import torch

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.wan import wan22_experts
from musubi_tuner.architectures.wan.dit_files import save_wan_dit_original
from musubi_tuner.architectures.wan.tiny import make_tiny_dit
from musubi_tuner.inference.denoise import guided_velocity, initial_noise
from musubi_tuner.inference.generate import RenderSettings, render, resolve_spec
from musubi_tuner.inference.prompts import PromptSpec
from musubi_tuner.inference.schedulers import make_flow_scheduler
from musubi_tuner.training.timesteps import TimestepConfig, TimestepSample, sample_timesteps

WAN = get_architecture("wan")
CPU = torch.device("cpu")


def _expert_files(tmp_path, task="t2v-A14B"):
    low, high = tmp_path / "low_noise.safetensors", tmp_path / "high_noise.safetensors"
    save_wan_dit_original(make_tiny_dit(task, seed=0), low)
    save_wan_dit_original(make_tiny_dit(task, seed=1), high)
    return low, high


def _args(low, high, **extra):
    values = dict(task="t2v-A14B", dit=str(low), dit_high_noise=str(high) if high else None, timestep_boundary=None,
                  offload_inactive_dit=False, guidance_scale_high_noise=None, force_v2_1_time_embedding=False,
                  lora_weight=[], lora_multiplier=[], include_patterns=None, exclude_patterns=None)
    values.update(extra)
    return argparse.Namespace(**values)


def _load(args):
    return WAN.load_dit(args, CPU, torch.float32)


def _paired(args):
    dit = _load(args)
    WAN.attach_expert_dits(dit, _load, args, CPU)
    return dit


def _text(seed, length):
    return {"t5": [torch.randn(length, 32, generator=torch.Generator().manual_seed(seed))]}


# ---- generation ---------------------------------------------------------------------------------------------
def test_expert_switch_at_the_boundary_equals_a_hand_driven_two_model_loop(tmp_path):
    low_path, high_path = _expert_files(tmp_path)
    args = _args(low_path, high_path)
    spec = resolve_spec(WAN, PromptSpec(prompt="p", width=32, height=32, frames=5, seed=7, steps=6), args)
    assert (spec.steps, spec.flow_shift, spec.guidance_scale) == (6, 12.0, 3.0)  # t2v-A14B defaults (low noise CFG)
    cond, uncond = _text(1, 5), _text(2, 3)
    settings = RenderSettings(solver="unipc", device=CPU, progress=False)
    ours = render(WAN, _paired(args), None, spec, cond, uncond, settings, args)

    low, high = _load(args), _load(argparse.Namespace(**{**vars(args), "dit": str(high_path)}))
    scheduler = make_flow_scheduler("unipc", spec.flow_shift)
    latents = initial_noise((1, *WAN.latent_shape(32, 32, 5)), spec.seed, CPU)
    used = []
    for t in scheduler.set_timesteps(spec.steps, device=CPU):
        is_high = float(t) / 1000 >= 0.875  # the t2v-A14B boundary
        model, scale = (high, 4.0) if is_high else (low, 3.0)  # and its (high, low) guidance scales
        used.append(is_high)
        tb = t.reshape(1).float()
        velocity = guided_velocity(WAN.predict(model, cond, latents, tb), WAN.predict(model, uncond, latents, tb), scale)
        latents = scheduler.step(velocity, t, latents)
    assert True in used and False in used  # both experts ran
    assert torch.equal(ours, latents)
    low_only = render(WAN, _load(args), None, spec, cond, uncond, settings, args)
    assert not torch.allclose(low_only, latents, atol=1e-3)  # the high-noise expert made a difference


def test_a_mixed_batch_runs_each_sample_through_its_expert(tmp_path):
    low_path, high_path = _expert_files(tmp_path)
    args = _args(low_path, high_path, offload_inactive_dit=True)
    dit = _paired(args)
    low, high = _load(args), _load(argparse.Namespace(**{**vars(args), "dit": str(high_path)}))
    x = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = {"t5": _text(1, 5)["t5"] + _text(2, 4)["t5"]}
    t = torch.tensor([950.0, 100.0])
    out = WAN.predict(dit, batch, x, t)
    assert torch.equal(out[0:1], WAN.predict(high, {"t5": batch["t5"][:1]}, x[0:1], t[0:1]))
    assert torch.equal(out[1:2], WAN.predict(low, {"t5": batch["t5"][1:]}, x[1:2], t[1:2]))
    # the swap moved tensors, not modules: parameters()/state_dict() hold exactly one expert
    pair = wan22_experts.expert_pair(dit)
    active = high if pair.active_is_high else low
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), active.state_dict().values()))
    assert len(list(dit.parameters())) == len(list(low.parameters()))


def test_one_dit_for_an_a14b_task_still_switches_guidance_at_the_boundary():
    args = argparse.Namespace(task="i2v-A14B", timestep_boundary=None, guidance_scale_high_noise=None)
    schedule = WAN.guidance_schedule(args, 3.5)
    assert (schedule(901.0), schedule(900.0), schedule(899.0)) == (3.5, 3.5, 3.5)
    args = argparse.Namespace(task="t2v-A14B", timestep_boundary=500, guidance_scale_high_noise=6.0)
    schedule = WAN.guidance_schedule(args, 2.0)
    assert (schedule(500.0), schedule(499.0)) == (6.0, 2.0)  # 500 > 1: on the 0..1000 scale
    assert WAN.guidance_schedule(argparse.Namespace(task="t2v-14B"), 5.0) is None  # Wan2.1: one scale


# ---- training -----------------------------------------------------------------------------------------------
def test_same_side_draws_follow_the_first_draw_then_retry_each_sample():
    sequence = iter([900.0, 100.0, 950.0, 50.0, 20.0, 990.0])  # decider, then tries for samples 0 and 1

    def draw(n, uniform):
        t = torch.tensor([next(sequence) for _ in range(n)])
        return TimestepSample(sigmas=(t - 1) / 1000, timesteps=t)

    sample = wan22_experts.draw_same_expert_timesteps(draw, 2, 0.875)
    assert sample.timesteps.tolist() == [950.0, 990.0]
    assert torch.allclose(sample.sigmas, torch.tensor([0.949, 0.989]))


def test_same_side_draws_keep_the_flags_distribution_on_each_side():
    config = TimestepConfig(sampling="shift", discrete_flow_shift=3.0)
    gen = torch.Generator().manual_seed(0)
    sides = []
    for _ in range(200):
        sample = wan22_experts.draw_same_expert_timesteps(lambda n, u: sample_timesteps(config, n, gen, None, u), 4, 0.875)
        high = wan22_experts.is_high_noise(sample.timesteps, 0.875)
        assert high.all() or not high.any()
        sides.append(bool(high[0]))
    plain = sample_timesteps(config, 20000, torch.Generator().manual_seed(1), None)
    expected = wan22_experts.is_high_noise(plain.timesteps, 0.875).float().mean().item()
    assert abs(sum(sides) / len(sides) - expected) < 0.1  # the first draw picks the side at the flags' rate


def test_dual_training_runs_every_step_on_the_expert_of_its_timesteps(tmp_path, monkeypatch):
    from musubi_tuner import wan_train_network
    from musubi_tuner.architectures.wan.architecture import WanArchitecture
    from safetensors.torch import load_file
    from wan_fixtures import make_cached_workspace, run

    ws = make_cached_workspace(tmp_path)
    high_path = tmp_path / "high_noise.safetensors"
    save_wan_dit_original(make_tiny_dit("t2v-A14B", seed=5), high_path)
    high_q = load_file(high_path)["blocks.0.self_attn.q.weight"]
    seen = []
    original = WanArchitecture._predict_one

    def spy(self, dit, batch, noisy, timesteps):
        pair = wan22_experts.expert_pair(dit)
        q = dit.blocks[0].attn1.to_q.weight
        seen.append((wan22_experts.is_high_noise(timesteps, 0.875).tolist(), pair.active_is_high,
                     torch.equal(q.detach().float(), high_q)))
        return original(self, dit, batch, noisy, timesteps)

    monkeypatch.setattr(WanArchitecture, "_predict_one", spy)
    argv = ws.train_args(tmp_path / "out", 12)
    argv[argv.index("t2v-1.3B")] = "t2v-A14B"
    argv += ["--dit_high_noise", str(high_path), "--timestep_sampling", "uniform", "--offload_inactive_dit"]
    assert run(wan_train_network.main, argv) == 0
    assert len(seen) == 12
    for sides, active_high, holds_high_weights in seen:
        assert all(side == active_high for side in sides) and holds_high_weights == active_high
    assert {active for _, active, _ in seen} == {True, False}  # 12 uniform draws: both experts trained
    assert (tmp_path / "out" / "lora.safetensors").exists()


# ---- flags --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--task", "t2v-14B", "--dit_high_noise", "h.safetensors"], "--dit_high_noise is for the Wan2.2 tasks"),
    (["--task", "t2v-A14B", "--offload_inactive_dit", "--blocks_to_swap", "2"], "cannot be combined with --blocks_to_swap"),
    (["--task", "t2v-A14B", "--timestep_boundary", "1500"], "--timestep_boundary 1500"),
])
def test_expert_flags_are_checked_before_any_model_loads(extra, needle, tmp_path):
    from musubi_tuner.errors import UserError
    from musubi_tuner.training.cli import parse_training_args

    with pytest.raises(UserError, match=needle):
        parse_training_args(WAN, ["--dit", "never_loaded.safetensors", "--output_dir", str(tmp_path), *extra])


def test_generation_refuses_high_noise_loras_without_the_high_noise_expert(tmp_path, capsys):
    from musubi_tuner import wan_generate_video
    from wan_fixtures import run

    argv = ["--task", "t2v-A14B", "--dit", "never.safetensors", "--lora_weight_high_noise", "x.safetensors",
            "--prompt", "p", "--save_path", str(tmp_path)]
    assert run(wan_generate_video.main, argv) == 2
    assert "--lora_weight_high_noise needs --dit_high_noise" in capsys.readouterr().err


def test_timestep_boundary_defaults_and_scale():
    ns = argparse.Namespace
    assert wan22_experts.timestep_boundary(ns(task="t2v-A14B", timestep_boundary=None)) == 0.875
    assert wan22_experts.timestep_boundary(ns(task="i2v-A14B", timestep_boundary=None)) == 0.9
    assert wan22_experts.timestep_boundary(ns(task="i2v-A14B", timestep_boundary=850)) == 0.85
    assert wan22_experts.timestep_boundary(ns(task="t2v-14B", timestep_boundary=None)) is None


# ---- LoRA files, one per expert -----------------------------------------------------------------------------
def test_per_expert_loras_load_in_comfyui_and_in_diffusers_transformer_2(tmp_path):
    """i2v-A14B experts (no CLIP branch): each expert's LoRA is consumed whole by ComfyUI's key rule and loads
    unconverted into diffusers' two-expert WanPipeline (`transformer` = high noise, `transformer_2` = low noise)."""
    from diffusers import WanPipeline

    from musubi_tuner.architectures.wan.dit_files import wan_dit_to_original
    from musubi_tuner.inference.lora_merge import merge_loras_into_dit
    from musubi_tuner.networks.lora_files import load_lora_file
    from test_wan_lora_interop import _forward, _trainer_lora_file, comfy_unconsumed_keys

    experts = {"low": make_tiny_dit("i2v-A14B", seed=0), "high": make_tiny_dit("i2v-A14B", seed=1)}
    files = {}
    for name, dit in experts.items():
        (tmp_path / name).mkdir()
        network, files[name] = _trainer_lora_file(tmp_path / name, "i2v-A14B", dit)
        network.remove()
        written, _ = load_lora_file(files[name])
        assert not any("k_img" in k or "v_img" in k for k in written)  # no image branch to adapt
        assert comfy_unconsumed_keys(written, wan_dit_to_original(dit.state_dict())) == []
    gen = torch.Generator().manual_seed(3)
    inputs = {"hidden_states": torch.randn(1, 36, 2, 4, 4, generator=gen), "timestep": torch.tensor([950.0]),
              "encoder_hidden_states": torch.randn(1, 512, 32, generator=gen)}
    ours = {}
    for name, seed in (("low", 0), ("high", 1)):
        merged = make_tiny_dit("i2v-A14B", seed=seed)
        merge_loras_into_dit(WAN, merged, [str(files[name])], [1.0])
        ours[name] = _forward(merged, inputs)
        assert (ours[name] - _forward(make_tiny_dit("i2v-A14B", seed=seed), inputs)).abs().max() > 1e-3

    pipe = WanPipeline(transformer=make_tiny_dit("i2v-A14B", seed=1), transformer_2=make_tiny_dit("i2v-A14B", seed=0),
                       vae=None, text_encoder=None, tokenizer=None, scheduler=None, boundary_ratio=0.9)
    pipe.load_lora_weights(str(files["high"]))
    pipe.load_lora_weights(str(files["low"]), load_into_transformer_2=True)
    assert torch.allclose(_forward(pipe.transformer, inputs), ours["high"], atol=1e-5, rtol=0)
    assert torch.allclose(_forward(pipe.transformer_2, inputs), ours["low"], atol=1e-5, rtol=0)


def test_generate_with_a_lora_per_expert_equals_the_merged_experts(tmp_path):
    """wan_generate_video.py --lora_weight (low) --lora_weight_high_noise (high) gives the latents of the two experts
    merged beforehand with merge_lora.py."""
    from safetensors.torch import load_file

    from musubi_tuner import merge_lora, wan_generate_video
    from test_wan_lora_interop import _trainer_lora_file
    from wan_fixtures import make_workspace, run

    ws = make_workspace(tmp_path / "ws")
    low_path, high_path = _expert_files(tmp_path)
    loras = {}
    for name, seed in (("low", 0), ("high", 1)):
        (tmp_path / name).mkdir()
        network, loras[name] = _trainer_lora_file(tmp_path / name, "t2v-A14B", make_tiny_dit("t2v-A14B", seed=seed))
        network.remove()

    def generate(folder, low, high, *extra):
        argv = ["--task", "t2v-A14B", "--dit", str(low), "--dit_high_noise", str(high), *ws.vae_args, *ws.t5_args,
                "--prompt", "a blue square", "--video_size", "32", "32", "--video_length", "1", "--infer_steps", "4",
                "--seed", "5", "--save_path", str(folder), "--output_type", "latent", "--device", "cpu", *extra]
        assert run(wan_generate_video.main, argv) == 0
        (latent,) = folder.glob("*_latent.safetensors")
        return load_file(str(latent))["latent"]

    live = generate(tmp_path / "a", low_path, high_path, "--lora_weight", str(loras["low"]),
                    "--lora_weight_high_noise", str(loras["high"]), "--lora_multiplier_high_noise", "0.8")
    merged = {}
    for name, path, multiplier in (("low", low_path, "1.0"), ("high", high_path, "0.8")):
        merged[name] = tmp_path / f"merged_{name}.safetensors"
        assert run(merge_lora.main, ["--dit", str(path), "--lora_weight", str(loras[name]), "--lora_multiplier",
                                     multiplier, "--save_merged_model", str(merged[name])]) == 0
    # each merged file holds one expert's LoRA only: a LoRA merged into the wrong expert, or left out, would differ
    assert torch.equal(live, generate(tmp_path / "b", merged["low"], merged["high"]))


# ---- the files users download -------------------------------------------------------------------------------
def _comfy_scaled_fp8(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """ComfyUI's `*_fp8_scaled` layout of an original-layout state: block Linear weights in float8_e4m3fn with a
    per-tensor `scale_weight` (amax / 448) and a `scale_input`, plus the `scaled_fp8` marker."""
    out = {prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, tensor in state.items():
        if key.startswith("blocks.") and key.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().max().float() / 448.0
            out[prefix + key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            out[prefix + key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
            out[prefix + key.removesuffix(".weight") + ".scale_input"] = torch.ones(())
        else:
            out[prefix + key] = tensor
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_fp8_scaled_expert_loads_as_its_dequantized_weights(tmp_path, prefix):
    from safetensors.torch import save_file

    from musubi_tuner.architectures.wan.dit_files import load_wan_dit, wan_dit_to_original

    reference = make_tiny_dit("i2v-A14B", seed=1)
    original = {k: v.contiguous() for k, v in wan_dit_to_original(reference.state_dict()).items()}
    scaled = _comfy_scaled_fp8(original, prefix)
    path = tmp_path / "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    save_file(scaled, str(path))
    loaded = load_wan_dit(path, task="i2v-A14B", dtype=torch.float32)
    for key, value in wan_dit_to_original(loaded.state_dict()).items():
        fp8 = scaled.get(prefix + key)
        if prefix + key.removesuffix(".weight") + ".scale_weight" in scaled:  # exactly fp8 value * scale
            expected = fp8.float() * scaled[prefix + key.removesuffix(".weight") + ".scale_weight"]
            assert torch.equal(value, expected), key
            assert (value - original[key]).abs().max() <= original[key].abs().max() / 8  # fp8 rounding only
        else:
            assert torch.equal(value, original[key]), key


def test_a14b_generation_defaults_are_the_reference_configs():
    from musubi_tuner.architectures.wan.task_defaults import task_generation_defaults

    t2v, i2v = task_generation_defaults("t2v-A14B"), task_generation_defaults("i2v-A14B", 832, 480)
    assert (t2v.infer_steps, t2v.flow_shift, t2v.guidance_scale, t2v.frames) == (40, 12.0, 3.0, 81)
    assert (i2v.infer_steps, i2v.flow_shift, i2v.guidance_scale) == (40, 5.0, 3.5)  # no Wan2.1 480p shift rule
    assert wan22_experts.A14B_EXPERTS["t2v-A14B"].guidance_high_noise == 4.0


def test_a_wrong_high_noise_file_is_named_by_its_flag(tmp_path):
    from musubi_tuner.errors import CheckpointError

    low = tmp_path / "low.safetensors"
    wrong = tmp_path / "wan2.1_i2v.safetensors"
    save_wan_dit_original(make_tiny_dit("t2v-A14B"), low)
    save_wan_dit_original(make_tiny_dit("i2v-14B"), wrong)
    args = _args(low, wrong)
    with pytest.raises(CheckpointError, match=rf"--dit_high_noise {wrong} is a I2V DiT.*--task t2v-A14B needs"):
        _paired(args)


def test_moving_an_expert_leaves_the_tensors_a_pending_backward_holds():
    model = torch.nn.Linear(2, 2)
    held = model.weight
    before = held.detach().clone()
    wan22_experts.move_tensors(model, torch.device("meta"))
    assert model.weight.is_meta and model.weight is not held
    assert held.device.type == "cpu" and torch.equal(held.detach(), before)  # not changed in place, as Module.to would


def test_a_mixed_batch_trains_the_one_lora_through_both_experts(tmp_path):
    from musubi_tuner.training.network_setup import build_network
    from test_wan_lora_interop import _train_args

    low_path, high_path = _expert_files(tmp_path)
    dit = _paired(_args(low_path, high_path, offload_inactive_dit=True))
    network = build_network(WAN, dit, _train_args(tmp_path, "t2v-A14B"))
    ups = [p for n, p in network.named_parameters() if "lora_up" in n]
    x = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = {"t5": _text(1, 5)["t5"] + _text(2, 4)["t5"]}
    WAN.predict(dit, batch, x, torch.tensor([950.0, 100.0])).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)


def test_a_mixed_batch_under_gradient_checkpointing_runs_through_the_first_samples_expert(tmp_path):
    """Checkpointed blocks recompute with the weights their modules hold at backward time, so a mixed training batch
    must not switch experts inside one step: it runs through the expert of its first sample (the reference's one
    expert per step), and its gradients equal that expert's alone."""
    from musubi_tuner.training.network_setup import build_network
    from test_wan_lora_interop import _train_args

    low_path, high_path = _expert_files(tmp_path)
    args = _args(low_path, high_path)
    x = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = {"t5": _text(1, 5)["t5"] + _text(2, 4)["t5"]}
    t = torch.tensor([950.0, 100.0])  # first sample high noise

    def grads(dit):
        dit.enable_gradient_checkpointing()
        dit.train()
        torch.manual_seed(3)  # the same LoRA initialisation for both
        network = build_network(WAN, dit, _train_args(tmp_path, "t2v-A14B"))
        out = WAN.predict(dit, batch, x, t)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for n, p in sorted(network.named_parameters()) if p.grad is not None]

    out, got = grads(_paired(args))
    want_out, want = grads(_load(argparse.Namespace(**{**vars(args), "dit": str(high_path)})))
    assert torch.equal(out, want_out)
    assert len(got) == len(want) > 0 and all(torch.equal(a, b) for a, b in zip(got, want))


class CopyingEngine:
    """A CPU transfer engine whose "device copies" are new tensors, so a test can tell whether the swapped block
    runs on the copies (as on a GPU) or on whatever CPU tensors its module happens to hold."""

    def __init__(self):
        self.copies, self.ptrs = {}, set()

    def start(self, slot):
        self.copies[slot.index] = [m.clone() for m in slot.masters]
        self.ptrs |= {c.data_ptr() for c in self.copies[slot.index]}

    def ready(self, slot):
        return self.copies[slot.index]

    def finish(self, slot):
        self.copies.pop(slot.index, None)


def _swapped_pair(args, blocks=1):
    from musubi_tuner.memory.block_swap import enable_block_swap

    dit = _load(args)
    engine = CopyingEngine()
    # the last block's weights are CPU masters copied in around its forward
    enable_block_swap(dit, blocks, CPU, engine=engine)
    WAN.attach_expert_dits(dit, _load, args, CPU)
    ran_on_copies = []
    dit.blocks[-1].attn1.to_q.register_forward_pre_hook(
        lambda m, a: ran_on_copies.append(m.weight.data_ptr() in engine.ptrs))
    return dit, ran_on_copies


def test_block_swap_with_two_experts_generates_exactly_as_without(tmp_path):
    """Each expert keeps the same blocks in CPU memory; at a switch the scheduler takes the other expert's masters,
    so the swapped block runs with the right expert's weights (with stale masters the high-noise steps would run
    the low-noise expert's last block)."""
    low_path, high_path = _expert_files(tmp_path)
    args = _args(low_path, high_path, blocks_to_swap=1)
    spec = resolve_spec(WAN, PromptSpec(prompt="p", width=32, height=32, frames=5, seed=7, steps=6), args)
    cond, uncond = _text(1, 5), _text(2, 3)
    settings = RenderSettings(solver="unipc", device=CPU, progress=False)
    want = render(WAN, _paired(args), None, spec, cond, uncond, settings, args)
    dit, ran_on_copies = _swapped_pair(args)
    assert torch.equal(render(WAN, dit, None, spec, cond, uncond, settings, args), want)
    assert torch.equal(render(WAN, dit, None, spec, cond, uncond, settings, args), want)  # and again, after switches
    # after every switch the swapped block still ran on the engine's copies of the active expert's masters
    assert len(ran_on_copies) == 4 * 6 and all(ran_on_copies)


def test_block_swap_with_two_experts_trains_exactly_as_without(tmp_path):
    """Checkpointed training steps alternating between the experts: the same loss and LoRA gradients with the last
    block swapped as without block swap."""
    from musubi_tuner.memory.block_swap import full_recompute
    from musubi_tuner.training.network_setup import build_network
    from test_wan_lora_interop import _train_args

    low_path, high_path = _expert_files(tmp_path)
    args = _args(low_path, high_path, blocks_to_swap=1)
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = {"t5": _text(1, 5)["t5"]}

    def steps(dit):
        dit.enable_gradient_checkpointing()
        dit.train()
        torch.manual_seed(3)
        network = build_network(WAN, dit, _train_args(tmp_path, "t2v-A14B"))
        ups = [p for n, p in sorted(network.named_parameters()) if "lora_up" in n]
        with torch.no_grad():
            for p in ups:
                p.normal_(std=0.01)  # non-zero ups: the downs get gradients too
        out = []
        for t in (950.0, 100.0, 950.0):
            network.zero_grad()
            with full_recompute():
                loss = WAN.predict(dit, batch, x, torch.tensor([t])).square().mean()
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for _, p in sorted(network.named_parameters())]))
        return out

    swapped, ran_on_copies = _swapped_pair(args)
    for (loss, grads), (want_loss, want_grads) in zip(steps(swapped), steps(_paired(args))):
        assert torch.equal(loss, want_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))
    assert len(ran_on_copies) == 3 * 2 and all(ran_on_copies)  # forward and checkpointed recompute, each step


def test_a_plain_fp8_e4m3fn_expert_loads_upcast(tmp_path):
    """fp8_e4m3fn files without scales (e.g. wan2.2_t2v_low_noise_14B_fp8_e4m3fn.safetensors) load as their fp8
    values in the compute dtype."""
    from musubi_tuner.architectures.wan.dit_files import load_wan_dit

    path = tmp_path / "wan2.2_t2v_low_noise_14B_fp8_e4m3fn.safetensors"
    source = make_tiny_dit("t2v-A14B")
    save_wan_dit_original(source, path, dtype=torch.float8_e4m3fn)
    loaded = load_wan_dit(path, task="t2v-A14B", dtype=torch.bfloat16)
    q = loaded.blocks[0].attn1.to_q.weight
    assert q.dtype == torch.bfloat16
    assert torch.equal(q, source.blocks[0].attn1.to_q.weight.to(torch.float8_e4m3fn).to(torch.bfloat16))
