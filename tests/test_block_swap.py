"""--blocks_to_swap: the swapped blocks keep their weights in CPU memory between calls, the transfers are scheduled
one block ahead (forward, checkpointed backward, generation), and nothing else changes."""

import pytest
import torch

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.wan.tiny import make_tiny_dit, tiny_dit_config
from musubi_tuner.errors import UserError
from musubi_tuner.memory.block_swap import (
    BlockSwapOptions,
    SyncEngine,
    enable_block_swap,
    flat_layout,
    full_recompute,
    repeated_blocks,
)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=gen), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=gen), return_dict=False)


def _four_block_dit():
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel.from_config({**tiny_dit_config("t2v-1.3B"), "num_layers": 4}).eval()


class RecordingEngine(SyncEngine):
    """The CPU engine, logging what the scheduler asks for and how many blocks are in flight."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.log, self.peak = [], 0

    def start(self, slot):
        super().start(slot)
        self.log.append(f"start{slot.index}")
        self.peak = max(self.peak, len(self.copies))

    def ready(self, slot):
        self.log.append(f"ready{slot.index}")
        return super().ready(slot)

    def finish(self, slot):
        super().finish(slot)
        self.log.append(f"finish{slot.index}")


def test_outputs_and_gradients_are_unchanged_and_weights_return_to_cpu_storage():
    reference, swapped = make_tiny_dit(), make_tiny_dit()
    inputs = _inputs()
    expected = reference(**inputs)[0]
    scheduler = enable_block_swap(swapped, 1, torch.device("cpu"))
    last = repeated_blocks(swapped)[-1]
    storage = [p.data_ptr() for p in last.parameters()]
    seen = []
    last.register_forward_pre_hook(lambda m, a: seen.append([p.data_ptr() for p in m.parameters()]))
    assert torch.equal(swapped(**inputs)[0], expected)
    assert seen and [p.data_ptr() for p in last.parameters()] == storage  # back on the CPU copies after the call
    scheduler.remove()


def test_generation_prefetches_one_block_ahead_and_wraps_to_the_next_step():
    reference, model, engine = _four_block_dit(), _four_block_dit(), RecordingEngine()
    enable_block_swap(model, 3, torch.device("cpu"), engine=engine)
    with torch.no_grad():
        for _ in range(2):  # two denoising steps
            assert torch.equal(model(**_inputs())[0], reference(**_inputs())[0])
    # while the last block runs, the first one is copied for the next step
    step1 = ["start0", "ready0", "start1", "finish0", "ready1", "start2", "finish1", "ready2", "start0", "finish2"]
    step2 = ["ready0", "start1", "finish0", "ready1", "start2", "finish1", "ready2", "start0", "finish2"]
    assert engine.log == step1 + step2
    assert engine.peak == 2


def test_checkpointed_backward_prefetches_the_next_block_to_recompute_in_reverse():
    grads, engine = [], RecordingEngine()
    for swap in (0, 3):
        model = _four_block_dit()
        model.enable_gradient_checkpointing()
        model.train()
        if swap:
            enable_block_swap(model, swap, torch.device("cpu"), engine=engine)
        x = _inputs()["hidden_states"].requires_grad_(True)
        with full_recompute():
            out = model(**{**_inputs(), "hidden_states": x})[0]
        out.square().mean().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1])) and len(grads[0]) == len(grads[1])
    forward = ["start0", "ready0", "start1", "finish0", "ready1", "start2", "finish1", "ready2", "finish2",
               "start2"]  # the last block is recomputed first, so it is fetched again at once
    backward = ["ready2", "start1", "finish2", "ready1", "start0", "finish1", "ready0", "finish0"]
    assert engine.log == forward + backward
    assert engine.peak == 2


def test_a_ring_of_one_never_has_two_blocks_resident():
    reference, model, engine = _four_block_dit(), _four_block_dit(), RecordingEngine()
    enable_block_swap(model, 3, torch.device("cpu"), BlockSwapOptions(ring_size=1), engine=engine)
    with torch.no_grad():
        assert torch.equal(model(**_inputs())[0], reference(**_inputs())[0])
    assert engine.peak == 1
    assert engine.log[:4] == ["start0", "ready0", "finish0", "start1"]


def test_a_forward_without_its_backward_leaves_no_stale_block_in_the_ring():
    model, engine = _four_block_dit(), RecordingEngine()
    model.enable_gradient_checkpointing()
    model.train()
    enable_block_swap(model, 3, torch.device("cpu"), engine=engine)
    for _ in range(2):  # grad on, no backward: the prefetched recompute of the last block never comes
        model(**_inputs())
    assert engine.peak == 2 and len(engine.copies) <= 2


def test_flat_layout_aligns_every_tensor():
    offsets, total = flat_layout([torch.zeros(3), torch.zeros(1, dtype=torch.float8_e4m3fn), torch.zeros(100)])
    assert offsets == [0, 256, 512] and total == 1024


def test_ring_buffer_views_hold_a_mixed_dtype_block_without_overlap():
    """The CUDA engine's ring and staging buffers: every tensor of a block (fp8 weights, fp32 scales, biases) gets
    its own aligned view of one flat buffer, and a round trip through it is exact."""
    from musubi_tuner.memory.block_swap import views_in
    from musubi_tuner.memory.fp8 import store_dit_in_fp8

    model = make_tiny_dit()
    store_dit_in_fp8(model, get_architecture("wan"), scaled=True)
    scheduler = enable_block_swap(model, 1, torch.device("cpu"))
    slot = scheduler.slots[0]
    assert {m.dtype for m in slot.masters} >= {torch.float8_e4m3fn, torch.float32}
    buffer = torch.full((slot.nbytes,), 255, dtype=torch.uint8)
    views = views_in(buffer, slot)
    for view, master in zip(views, slot.masters):
        view.copy_(master)
    assert all(v.dtype == m.dtype and v.shape == m.shape for v, m in zip(views, slot.masters))
    assert all(torch.equal(v.view(torch.uint8), m.view(torch.uint8)) for v, m in zip(views, slot.masters))
    scheduler.remove()


def test_a_swap_count_out_of_range_names_the_flag():
    with pytest.raises(UserError, match="--blocks_to_swap 2: this model has 2 blocks"):
        enable_block_swap(make_tiny_dit(), 2, torch.device("cpu"))


def test_two_stream_families_split_n_as_the_reference_and_wan_takes_the_last_n():
    """The reference's meaning of N: HunyuanVideo / FLUX swap the last N // 2 double and (N - N // 2) * 2 + 1 single
    blocks, keeping at least one of each on the device (for the released HunyuanVideo, 20 + 40 blocks, N <= 38; its
    docs advise 36 for training); Wan the last N blocks."""
    from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_dit
    from musubi_tuner.memory.block_swap import double_single_split

    double, single = [f"d{i}" for i in range(20)], [f"s{i}" for i in range(40)]
    assert double_single_split(double, single, 5) == ["d18", "d19"] + [f"s{i}" for i in range(33, 40)]
    assert len(double_single_split(double, single, 36)) == 18 + 37
    assert len(double_single_split(double, single, 38)) == 19 + 39
    with pytest.raises(UserError, match="--blocks_to_swap 39: swaps 19 double and 41 single.*use 1 to 38"):
        double_single_split(double, single, 39)
    hv = tiny_hv_dit(single_layers=4)
    assert get_architecture("hunyuan_video").swapped_blocks(hv, 2) == \
        [hv.transformer_blocks[1], *hv.single_transformer_blocks[1:]]
    with pytest.raises(UserError, match="too small to swap any"):
        get_architecture("hunyuan_video").swapped_blocks(tiny_hv_dit(), 1)  # 2 single blocks: no N fits
    # FLUX (19 + 38 blocks) keeps two of each: N <= 34 (17 double + 35 single)
    flux_double, flux_single = [f"d{i}" for i in range(19)], [f"s{i}" for i in range(38)]
    assert len(double_single_split(flux_double, flux_single, 34, keep=2)) == 17 + 35
    with pytest.raises(UserError, match="use 1 to 34"):
        double_single_split(flux_double, flux_single, 35, keep=2)
    wan = _four_block_dit()
    assert get_architecture("wan").swapped_blocks(wan, 3) == list(wan.blocks[1:])


def test_swapping_the_reference_split_keeps_the_outputs_exact():
    from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_dit

    hv, reference, engine = get_architecture("hunyuan_video"), tiny_hv_dit(single_layers=4), RecordingEngine()
    model = tiny_hv_dit(single_layers=4)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 1, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                  encoder_attention_mask=torch.ones(1, 6, dtype=torch.int64),
                  pooled_projections=torch.randn(1, 32, generator=g), guidance=torch.tensor([1000.0]),
                  return_dict=False)
    enable_block_swap(model, 2, torch.device("cpu"), engine=engine, blocks=hv.swapped_blocks(model, 2))
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], reference(**inputs)[0])
    assert [e for e in engine.log if e.startswith("ready")] == ["ready0", "ready1", "ready2", "ready3"]


def test_the_trainer_returns_swapped_weights_after_every_step(monkeypatch, tmp_path):
    from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_train_network
    from musubi_tuner.memory import block_swap
    from wan_fixtures import make_workspace, run

    ws = make_workspace(tmp_path)
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(ws.toml), *ws.t5_args]) == 0
    calls = {"before": 0, "after": 0}
    for name in calls:
        original = getattr(block_swap.BlockSwapScheduler, name)

        def counted(self, k, _name=name, _original=original):
            calls[_name] += 1
            _original(self, k)

        monkeypatch.setattr(block_swap.BlockSwapScheduler, name, counted)
    args = ws.train_args(tmp_path / "o", 2, "--gradient_checkpointing", "--blocks_to_swap", "1",
                         "--block_swap_h2d_only", "--use_pinned_memory_for_block_swap")
    assert run(wan_train_network.main, args) == 0
    assert calls["before"] == calls["after"] == 4  # 2 steps x (forward + recompute)


@pytest.mark.parametrize("flags, message", [
    (["--block_swap_h2d_only"], "--block_swap_h2d_only needs --blocks_to_swap N and --gradient_checkpointing"),
    (["--block_swap_h2d_only", "--blocks_to_swap", "1"], "--block_swap_h2d_only needs"),
    (["--gradient_checkpointing_cpu_offload"], "--gradient_checkpointing_cpu_offload needs --gradient_checkpointing"),
])
def test_offloading_flags_name_what_they_need(flags, message):
    from musubi_tuner.architectures import get_architecture
    from musubi_tuner.training.cli import parse_training_args

    with pytest.raises(UserError, match=message):
        parse_training_args(get_architecture("wan"), ["--output_dir", "o", "--task", "t2v-1.3B", *flags])


def test_options_follow_the_reference_flags():
    import argparse

    args = argparse.Namespace(use_pinned_memory_for_block_swap=True, block_swap_h2d_only=True, block_swap_ring_size=1)
    assert BlockSwapOptions.from_args(args) == BlockSwapOptions(pinned_memory=True, reuse_buffers=True, ring_size=1)
