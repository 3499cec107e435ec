"""The training loss, shared by the training step and the validation loss."""

from __future__ import annotations

import torch


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean squared error of the velocity per sample, in float32.

    mask: per-item loss weights (B, 1, [F,] h, w) on the latent grid (dataset/masks.py), broadcast over channels.
    Each element's error is multiplied by its weight before the mean, so a masked-out area adds nothing and a
    partly masked item weighs less than a full one (as kohya's masked loss); None = every element counts fully.
    """
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        loss = loss * mask.to(loss.device, torch.float32)
    return loss.mean(dim=list(range(1, loss.ndim)))
