"""Which DiT Linear layers --fp8_base (--fp8) stores in fp8: the reference's rule for every family.

Plain fp8: the reference casts the whole DiT to float8_e4m3fn (`transformer.to(dit_weight_dtype)`), so every Linear.
Scaled: its `optimize_state_dict_with_fp8` quantizes the weight keys (ORIGINAL names) that contain a target and no
exclude. The lists below are copied from the reference's sources, not from our architecture classes, and the
original key of each diffusers Linear is found through the family's own state-dict converter (each Linear's weight
is filled with its index, so a fused original tensor shows which diffusers layers it holds).
"""

import pytest
import torch
from torch import nn

from musubi_tuner.architectures import get_architecture
from musubi_tuner.architectures.flux_kontext.tiny import tiny_flux_dit
from musubi_tuner.architectures.hunyuan_video.tiny import tiny_hv_dit
from musubi_tuner.architectures.wan.tiny import make_tiny_dit
from musubi_tuner.memory.fp8 import FP8_DTYPES, store_dit_in_fp8

REFERENCE_SCALED_RULES = {
    # wan/modules/model.py FP8_OPTIMIZATION_TARGET_KEYS / FP8_OPTIMIZATION_EXCLUDE_KEYS
    "wan": (["blocks"], ["norm", "patch_embedding", "text_embedding", "time_embedding", "time_projection", "head",
                         "modulation", "img_emb"]),
    # flux/flux_models.py Flux.fp8_optimization
    "flux_kontext": (["single_blocks", "double_blocks"], ["norm", "mod"]),
    # hunyuan_model/models.py HYVideoDiffusionTransformer.fp8_optimization
    "hunyuan_video": (["single_blocks", "double_blocks"],
                      ["norm", "time_in", "vector_in", "guidance_in", "txt_in", "img_in", "modulation", "bias", "head"]),
}
TINY = {"wan": lambda: make_tiny_dit("i2v-14B"), "flux_kontext": tiny_flux_dit, "hunyuan_video": tiny_hv_dit}


def _linears(dit: nn.Module) -> list[str]:
    return [name for name, layer in dit.named_modules() if type(layer) is nn.Linear]


def _original_keys_of_linears(arch, dit: nn.Module) -> dict[str, set[str]]:
    """Original weight key -> the diffusers Linear layers whose rows it holds."""
    names = _linears(dit)
    sd = {k: torch.full_like(v, -1.0) for k, v in dit.state_dict().items()}
    for i, name in enumerate(names):
        sd[f"{name}.weight"] = torch.full_like(sd[f"{name}.weight"], float(i))
    out = {}
    for key, tensor in arch.dit_state_dict_to_original(sd).items():
        held = {names[int(v)] for v in tensor.unique().tolist() if v >= 0}
        if key.endswith(".weight") and held:
            out[key] = held
    return out


def _reference_rule(arch_name: str, dit: nn.Module) -> set[str]:
    targets, excludes = REFERENCE_SCALED_RULES[arch_name]
    chosen = set()
    for key, layers in _original_keys_of_linears(get_architecture(arch_name), dit).items():
        if any(t in key for t in targets) and not any(e in key for e in excludes):
            chosen |= layers
    return chosen


@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_fp8_scaled_quantizes_exactly_the_layers_of_the_reference_rule(arch_name):
    dit = TINY[arch_name]()
    expected = _reference_rule(arch_name, dit)
    assert expected  # the rule matched something, so the comparison means something
    done = store_dit_in_fp8(dit, get_architecture(arch_name), scaled=True)
    assert set(done) == expected
    fp8 = {name for name, layer in dit.named_modules() if getattr(layer, "weight", None) is not None
           and layer.weight.dtype in FP8_DTYPES}
    assert fp8 == expected


@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_plain_fp8_stores_every_linear_as_the_reference_casts_the_whole_dit(arch_name):
    dit = TINY[arch_name]()
    linears = _linears(dit)
    assert store_dit_in_fp8(dit, get_architecture(arch_name), scaled=False) == linears
    assert all(dit.get_submodule(n).weight.dtype == torch.float8_e4m3fn for n in linears)


def test_the_modulation_layers_follow_each_family_rule():
    """The layers that made our HunyuanVideo fp8 weights 3.4 GB larger than the reference's: diffusers'
    `_skip_layerwise_casting_patterns` ("norm") matched `norm1.linear` (the reference's img_mod / txt_mod)."""
    hv = tiny_hv_dit()
    store_dit_in_fp8(hv, get_architecture("hunyuan_video"), scaled=True)
    assert hv.transformer_blocks[0].norm1.linear.weight.dtype == torch.float8_e4m3fn  # img_mod.linear
    assert hv.single_transformer_blocks[0].norm.linear.weight.dtype != torch.float8_e4m3fn  # modulation.linear
    flux = tiny_flux_dit()
    store_dit_in_fp8(flux, get_architecture("flux_kontext"), scaled=True)
    assert flux.transformer_blocks[0].norm1.linear.weight.dtype != torch.float8_e4m3fn  # img_mod.lin
    assert flux.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
