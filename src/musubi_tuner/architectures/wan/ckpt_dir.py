"""`--ckpt_dir`: the official Wan2.1 model folder (`Wan-AI/Wan2.1-T2V-14B` etc. as downloaded), whose file names
the reference's task configs give, fills the model flags that are not given one by one.

| flag | file in the folder |
|---|---|
| `--vae` | `Wan2.1_VAE.pth` |
| `--t5` | `models_t5_umt5-xxl-enc-bf16.pth` |
| `--t5_tokenizer` | `google/umt5-xxl/` |
| `--clip` | `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (I2V/FLF2V tasks) |
| `--dit` | `diffusion_pytorch_model.safetensors` or its shards `diffusion_pytorch_model-00001-of-0000N.safetensors` |

The reference takes only the VAE, T5 and CLIP from the folder; the DiT too is new here (the official folder holds
it in the original key layout, which `--dit` reads).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)

VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
DIT_STEM = "diffusion_pytorch_model"


def dit_in_folder(folder: Path) -> Path | None:
    """The single-file DiT, else the first shard of a sharded one (the loader brings in the others)."""
    single = folder / f"{DIT_STEM}.safetensors"
    if single.is_file():
        return single
    shards = sorted(folder.glob(f"{DIT_STEM}-00001-of-*.safetensors"))
    return shards[0] if shards else None


def fill_from_ckpt_dir(args: argparse.Namespace, needs_clip: bool) -> None:
    """Set each model flag left unset to its file in `--ckpt_dir`, when the folder has it (flags given by the user
    win). A folder that does not exist, or that holds none of the files, is an error naming `--ckpt_dir`."""
    folder = Path(args.ckpt_dir)
    if not folder.is_dir():
        raise UserError(f"--ckpt_dir {folder}: folder not found (the official Wan2.1 model folder, holding "
                        f"{VAE_FILE} and {T5_FILE})")
    candidates = {"vae": folder / VAE_FILE, "t5": folder / T5_FILE, "t5_tokenizer": folder / T5_TOKENIZER_DIR,
                  "dit": dit_in_folder(folder)}
    if needs_clip:
        candidates["clip"] = folder / CLIP_FILE
    found = {flag: path for flag, path in candidates.items() if path is not None and path.exists()}
    if not found:
        raise UserError(f"--ckpt_dir {folder}: holds none of {VAE_FILE}, {T5_FILE}, {T5_TOKENIZER_DIR}/, "
                        f"{DIT_STEM}*.safetensors; pass the official Wan2.1 model folder, or the files one by one")
    for flag, path in found.items():
        if getattr(args, flag, None) is None:
            setattr(args, flag, str(path))
            logger.info("--%s %s (from --ckpt_dir)", flag, path)
    missing = [f"--{flag}" for flag in candidates if flag not in found and getattr(args, flag, None) is None]
    if missing:
        logger.info("--ckpt_dir %s has no file for %s", folder, ", ".join(missing))
