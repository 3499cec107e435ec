"""--blocks_to_swap: the swapped blocks keep their weights in CPU memory between calls, and nothing else changes."""

import pytest
import torch

from musubi_tuner.architectures.wan.tiny import make_tiny_dit
from musubi_tuner.errors import UserError
from musubi_tuner.memory.block_swap import enable_block_swap, repeated_blocks


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=gen), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=gen), return_dict=False)


def test_outputs_and_gradients_are_unchanged_and_weights_return_to_cpu_storage():
    reference, swapped = make_tiny_dit(), make_tiny_dit()
    inputs = _inputs()
    expected = reference(**inputs)[0]
    handles = enable_block_swap(swapped, 1, torch.device("cpu"))
    last = repeated_blocks(swapped)[-1]
    storage = [p.data_ptr() for p in last.parameters()]
    seen = []
    last.register_forward_pre_hook(lambda m, a: seen.append([p.data_ptr() for p in m.parameters()]))
    assert torch.equal(swapped(**inputs)[0], expected)
    assert seen and [p.data_ptr() for p in last.parameters()] == storage  # back on the CPU copies after the call
    for handle in handles:
        handle.remove()


def test_training_with_checkpointing_gives_the_same_gradients():
    results = []
    for swap in (0, 1):
        model = make_tiny_dit()
        model.enable_gradient_checkpointing()
        model.train()
        if swap:
            enable_block_swap(model, swap, torch.device("cpu"))
        x = _inputs()["hidden_states"].requires_grad_(True)
        out = model(**{**_inputs(), "hidden_states": x})[0]
        out.square().mean().backward()
        results.append(x.grad.clone())
    assert torch.equal(results[0], results[1])


def test_a_swap_count_out_of_range_names_the_flag():
    with pytest.raises(UserError, match="--blocks_to_swap 2: this model has 2 blocks"):
        enable_block_swap(make_tiny_dit(), 2, torch.device("cpu"))


def _count_swaps(monkeypatch):
    from musubi_tuner.memory import block_swap

    calls = {"to_device": 0, "to_cpu": 0}
    for name in calls:
        original = getattr(block_swap.SwappedBlock, name)

        def counted(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(block_swap.SwappedBlock, name, counted)
    return calls


def test_checkpoint_recompute_returns_the_weights_inside_full_recompute(monkeypatch):
    from musubi_tuner.memory.block_swap import full_recompute

    calls = _count_swaps(monkeypatch)
    model = make_tiny_dit()
    model.enable_gradient_checkpointing()
    model.train()
    enable_block_swap(model, 1, torch.device("cpu"))
    x = _inputs()["hidden_states"].requires_grad_(True)
    with full_recompute():
        out = model(**{**_inputs(), "hidden_states": x})[0]
    out.square().mean().backward()
    # forward + recompute: staged twice, and returned twice (PyTorch's early stop would skip the second return)
    assert calls == {"to_device": 2, "to_cpu": 2}


def test_the_trainer_returns_swapped_weights_after_every_step(monkeypatch, tmp_path):
    from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs, wan_train_network
    from wan_fixtures import make_workspace, run

    ws = make_workspace(tmp_path)
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(ws.toml), *ws.t5_args]) == 0
    calls = _count_swaps(monkeypatch)
    args = ws.train_args(tmp_path / "o", 2, "--gradient_checkpointing", "--blocks_to_swap", "1")
    assert run(wan_train_network.main, args) == 0
    assert calls["to_device"] == calls["to_cpu"] == 4  # 2 steps x (forward + recompute)
