"""Post-hoc EMA of several saved LoRA files (the reference's `lora_post_hoc_ema.py`).

The oldest file starts the average; each later file i (0-based among the later ones) is folded in as
`avg = beta_i * avg + (1 - beta_i) * file_i`, in fp32, and each tensor is written back in its own dtype.
beta_i is one of:
- constant `--beta`;
- `--beta` linearly interpolated to `--beta2` over the later files;
- the power-function EMA of Karras et al. 2023 (arXiv 2312.02696) from `--sigma_rel`: gamma is the positive root of
  g^3 + 7g^2 + (16 - s^-2)g + (12 - s^-2) = 0 and beta_i = (1 - 1/t)^(gamma + 1) with t = i + 1, as the reference
  counts; so t = 1 gives beta 0 and the oldest file is replaced by the second (it carries no weight in this mode).

As in the reference, non-float tensors (e.g. LoKr's `lokr_factor`) and `.alpha` values are taken from the oldest
file, and alphas must agree across files. Key sets and shapes must agree too. Metadata comes from the newest file,
with fresh `sshs_*` hashes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from musubi_tuner.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent gamma for a relative standard deviation sigma_rel (paper's Algorithm 2)."""
    if not 0 < sigma_rel < 12**-0.5:
        raise UserError(f"--sigma_rel {sigma_rel}: must lie in (0, {12**-0.5:.4f}); 0.15-0.25 is typical")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= 0]
    return float(max(real))


def ema_betas(count: int, beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None) -> list[float]:
    """beta for each of the `count` files after the oldest, in order."""
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1.0 - 1.0 / t) ** (gamma + 1.0) for t in range(1, count + 1)]
    for flag, value in (("--beta", beta), ("--beta2", beta2)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"{flag} {value}: must lie in [0, 1]")
    end = beta if beta2 is None else beta2
    if count <= 1:
        return [beta] * count
    return [beta + (end - beta) * i / (count - 1) for i in range(count)]


def order_files(paths: Sequence[str | os.PathLike], no_sort: bool = False) -> list[Path]:
    """Oldest first: by modification time (stable for equal times), or as given with --no_sort."""
    files = [Path(p) for p in paths]
    for path in files:
        if not path.is_file():
            raise UserError(f"LoRA file not found: {path}")
    return files if no_sort else sorted(files, key=lambda p: p.stat().st_mtime)


def _read(path: Path) -> dict[str, torch.Tensor]:
    from musubi_tuner.networks.lora_files import load_lora_file

    return load_lora_file(path)[0]


def average_state_dicts(files: Sequence[Path], betas: Sequence[float]) -> dict[str, torch.Tensor]:
    """The EMA over `files` (oldest first; len(betas) == len(files) - 1), read one file at a time."""
    first = _read(files[0])
    dtypes = {k: v.dtype for k, v in first.items()}
    average = {k: (v.float() if v.is_floating_point() else v) for k, v in first.items()}
    for path, beta in zip(files[1:], betas):
        logger.info("folding in %s with beta %.4f", path, beta)
        current = _read(path)
        _check_same_keys(files[0], average, path, current)
        for key, value in current.items():
            _check_same_shape(files[0], average[key], path, value, key)
            if key.endswith(".alpha"):
                _check_same_alpha(files[0], average[key], path, value, key)
            elif value.is_floating_point() and average[key].is_floating_point():
                average[key] = average[key] * beta + value.float() * (1.0 - beta)
    return {k: v.to(dtypes[k]) for k, v in average.items()}


def _check_same_keys(first: Path, average: dict, path: Path, current: dict) -> None:
    missing, extra = sorted(set(average) - set(current)), sorted(set(current) - set(average))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"has extra keys {extra[:3]}"
        raise CheckpointError(f"{path} {what} compared with {first}; average only LoRAs of one training run")


def _check_same_shape(first: Path, a: torch.Tensor, path: Path, b: torch.Tensor, key: str) -> None:
    if a.shape != b.shape:
        raise CheckpointError(f"{key} has shape {tuple(b.shape)} in {path} but {tuple(a.shape)} in {first}; "
                              "average only LoRAs of one training run (same --network_dim)")


def _check_same_alpha(first: Path, a: torch.Tensor, path: Path, b: torch.Tensor, key: str) -> None:
    if not torch.allclose(a.float(), b.float()):
        raise CheckpointError(f"{key} is {float(b):g} in {path} but {float(a):g} in {first}; "
                              "average only LoRAs of one training run (same --network_alpha)")


def post_hoc_ema(paths: Sequence[str | os.PathLike], output_file: str | os.PathLike, *, beta: float = 0.95,
                 beta2: float | None = None, sigma_rel: float | None = None, no_sort: bool = False) -> Path:
    """Average the LoRA files and write `output_file` atomically (metadata of the newest file, fresh hashes)."""
    from musubi_tuner.networks.lora_files import load_lora_file, save_lora_file
    from musubi_tuner.utils.output_location import check_output_file

    output = check_output_file(output_file, "--output_file")  # before reading anything
    if len(paths) < 2:
        raise UserError(f"give at least two LoRA files to average, got {len(paths)}")
    files = order_files(paths, no_sort)
    if output.resolve() in {f.resolve() for f in files}:
        raise UserError(f"--output_file {output} is one of the inputs; choose a new file name")
    betas = ema_betas(len(files) - 1, beta, beta2, sigma_rel)
    averaged = average_state_dicts(files, betas)
    metadata = {k: v for k, v in load_lora_file(files[-1])[1].items() if not k.startswith("sshs_")}
    save_lora_file(averaged, output, metadata)
    logger.info("saved %s (EMA of %d files)", output, len(files))
    return output
