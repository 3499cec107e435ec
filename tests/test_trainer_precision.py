"""Mixed-precision plumbing of the trainer that CPU runs would otherwise never exercise."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from musubi_tuner import wan_cache_latents, wan_cache_text_encoder_outputs
from musubi_tuner.architectures import get_architecture
from musubi_tuner.training.cli import parse_training_args
from musubi_tuner.training.trainer import NetworkTrainer
from wan_fixtures import make_workspace, run


class ScaledTrainer(NetworkTrainer):
    """What accelerate sets up for fp16 on a GPU: a gradient scaler on the optimizer (here a CPU one)."""

    def _setup_accelerator(self) -> None:
        super()._setup_accelerator()
        acc = self.accelerator
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        # accelerate unscales only when it ran fp16 autocast itself (CUDA); do what it does there
        acc.unscale_gradients = lambda optimizer=None: [acc.scaler.unscale_(o.optimizer) for o in acc._optimizers]


def test_a_gradient_scaler_is_honoured_by_backward_clipping_and_step(tmp_path):
    ws = make_workspace(tmp_path)
    assert run(wan_cache_latents.main, ["--dataset_config", str(ws.toml), *ws.vae_args]) == 0
    assert run(wan_cache_text_encoder_outputs.main, ["--dataset_config", str(ws.toml), *ws.t5_args]) == 0
    arch = get_architecture("wan")
    results = {}
    for name, cls in (("plain", NetworkTrainer), ("scaled", ScaledTrainer)):
        args = parse_training_args(arch, ws.train_args(tmp_path / name, 3, "--max_grad_norm", "1.0"))
        path = cls(arch, args).train()
        results[name] = load_file(str(path))
    # the scaler multiplies the loss by 1024 and divides the grads back before clipping and the step
    for key, value in results["plain"].items():
        torch.testing.assert_close(results["scaled"][key], value, rtol=1e-4, atol=1e-6)
