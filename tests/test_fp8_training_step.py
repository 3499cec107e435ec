"""An fp8 training step (--fp8_base, with and without --fp8_scaled) against the same step with the DiT in bf16.

Tolerance, and why: fp8 e4m3 keeps 3 mantissa bits, so each stored weight is off by up to 2^-4 (6.25%) of itself,
about 2% on average. These errors are independent across the weights summed in every dot product, so they mostly
cancel: on the tiny model the loss moves by ~0.05% and the LoRA gradient keeps a cosine similarity of ~0.999 with
the bf16 one. We allow 1% relative on the loss, cosine >= 0.99 and 3% on the gradient norm: room for other seeds
and kernels, yet a broken fp8 path (a lost scale, a wrong layer cast, weights not dequantised) moves these far more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.wan.tiny import TINY_TEXT_DIM, make_tiny_dit
from musubi_tuner.memory.fp8 import store_dit_in_fp8
from musubi_tuner.networks import lora

WAN = get_architecture("wan")
LOSS_RTOL, GRAD_MIN_COSINE, GRAD_NORM_RTOL = 0.01, 0.99, 0.03


def _training_step(storage: str) -> tuple[float, torch.Tensor]:
    """Loss and flattened LoRA gradient of one flow-matching step on the tiny Wan DiT, computed in bf16 (autocast,
    as `--mixed_precision bf16` trains)."""
    dit = make_tiny_dit("t2v-1.3B")
    if storage != "bf16":
        store_dit_in_fp8(dit, WAN, scaled=storage == "fp8_scaled")
    network = lora.create_network(WAN, dit, 4, 4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero up matrices, so the down matrices get a gradient too
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    network.apply_to()
    latents = torch.randn(2, 16, 3, 4, 4, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = torch.tensor([0.3, 0.8])
    noisy = (1 - sigmas.view(-1, 1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1, 1) * noise
    batch = {"t5": [torch.randn(7, TINY_TEXT_DIM, generator=generator), torch.randn(5, TINY_TEXT_DIM, generator=generator)]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = WAN.predict(dit, batch, noisy, sigmas * 1000)
    loss = F.mse_loss(pred.float(), (noise - latents).float())
    loss.backward()
    grads = [p.grad.flatten().float() for _, p in sorted(network.named_parameters()) if p.grad is not None]
    assert len(grads) == 2 * len(network.loras)
    return loss.item(), torch.cat(grads)


@pytest.fixture(scope="module")
def bf16_step():
    return _training_step("bf16")


@pytest.mark.parametrize("storage", ["fp8", "fp8_scaled"])
def test_fp8_step_matches_the_bf16_step(storage, bf16_step):
    loss_ref, grad_ref = bf16_step
    loss, grad = _training_step(storage)
    assert abs(loss - loss_ref) <= LOSS_RTOL * loss_ref, (loss, loss_ref)
    cosine = F.cosine_similarity(grad, grad_ref, dim=0).item()
    assert cosine >= GRAD_MIN_COSINE, cosine
    assert abs(grad.norm() - grad_ref.norm()) <= GRAD_NORM_RTOL * grad_ref.norm()
    assert not torch.equal(grad, grad_ref)  # the fp8 path really ran: its weights differ from bf16's
