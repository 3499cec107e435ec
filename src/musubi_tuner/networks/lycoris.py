"""LoHa and LoKr modules and networks (`--network_module networks.loha` / `networks.lokr`), for every architecture.

They adapt the same ORIGINAL layers as LoRA (each architecture's `lora_candidates`, with the same include/exclude
rules) and attach the same way (`AdapterModule`): for a fused original layer the module's delta spans the whole
fused output, and each diffusers part adds its rows. Formulas, initialisation and defaults follow the reference:

- LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r. Init w1_b, w2_b ~ N(0, 1), w2_a ~ N(0, 0.1), w1_a = 0.
  `--network_dropout` drops inputs, `rank_dropout` masks ranks of w1_a and w2_a (scale / (1 - p)),
  `module_dropout` skips the module; all only while training.
- LoKr: delta = kron(w1, w2) * alpha / d. in/out features are split by `factorization(n, factor)` (factor -1 =
  most square); w1 is (out_l, in_m), w2 (out_k, in_n) is low rank (w2_a @ w2_b, d = r) when 0 < r < max(w2's
  shape), else full (d = max(w2's shape)). Init w1, w2 / w2_a Kaiming-uniform, w2_b = 0. As in the reference only
  `module_dropout` applies (a warning says when the other dropouts are given).
- LoRA+ (`loraplus_lr_ratio`) puts the w2 factors in the faster group, as the reference.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.networks.lora import AdapterModule, LoRANetwork, create_network, create_network_from_weights
from musubi_tuner.networks.lora_formats import LoraWeights
from musubi_tuner.networks.lycoris_weights import (
    LOKR_FACTOR_KEY,
    LohaWeights,
    LokrWeights,
    factorization,
    lycoris_to_layout,
)
from musubi_tuner.networks.targets import LoraTarget

logger = logging.getLogger(__name__)


def _alpha_and_scale(alpha: float | torch.Tensor | None, dim: int) -> tuple[float, float]:
    alpha = 0.0 if alpha is None else float(alpha)
    alpha = float(dim) if alpha == 0 else alpha  # alpha 0/None: no scaling
    return alpha, alpha / dim


def _check_shapes(module: AdapterModule, found: dict[str, torch.Tensor], where: str) -> None:
    expected = {k: tuple(getattr(module, k).shape) for k in found}
    got = {k: tuple(v.shape) for k, v in found.items()}
    if expected != got:
        raise CheckpointError(f"{where}: {module.lora_name} has shapes {got}, the network expects {expected} "
                              "(other --network_dim or factor? use --dim_from_weights)")


def _copy_in(module: AdapterModule, found: dict[str, torch.Tensor], alpha: torch.Tensor | None, where: str) -> None:
    """Load a file's tensors (named as the module's parameters) and alpha into `module`, shapes checked."""
    _check_shapes(module, found, where)
    for key, value in found.items():
        getattr(module, key).data.copy_(value)
    value, module.scale = _alpha_and_scale(alpha, module.lora_dim)
    module.alpha.fill_(value)


class LoHaModule(AdapterModule):
    """LoHa for one original layer; see the module docstring."""

    def __init__(self, target: LoraTarget, rank: int, alpha: float | torch.Tensor | None, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__(target, multiplier, dropout, rank_dropout, module_dropout)
        self.lora_dim = rank
        out_features, in_features = target.out_features, target.in_features
        self.hada_w1_a = nn.Parameter(torch.zeros(out_features, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_features))
        nn.init.normal_(self.hada_w1_b, std=1.0)  # the reference's order of random draws
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.normal_(self.hada_w2_a, std=0.1)
        alpha, self.scale = _alpha_and_scale(alpha, rank)
        self.register_buffer("alpha", torch.tensor(alpha))

    def _per_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self._skip_by_module_dropout():
            return None
        x = x.to(self.hada_w1_a.dtype)
        if self.dropout is not None and self.training:
            x = F.dropout(x, p=self.dropout)
        w1_a, w2_a, scale = self.hada_w1_a, self.hada_w2_a, self.scale
        if self.rank_dropout is not None and self.training:
            mask = (torch.rand((1, self.lora_dim), device=w1_a.device) > self.rank_dropout).to(w1_a.dtype)
            w1_a, w2_a = w1_a * mask, w2_a * mask
            scale = scale / (1.0 - self.rank_dropout)
        return x, (w1_a @ self.hada_w1_b) * (w2_a @ self.hada_w2_b), scale

    def _part_output(self, index: int, state: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
        x, weight, scale = state
        return F.linear(x, weight[self._row_slices[index]]) * (self.multiplier * scale)

    def weights(self) -> LohaWeights:
        return LohaWeights(self.hada_w1_a.detach(), self.hada_w1_b.detach(), self.hada_w2_a.detach(),
                           self.hada_w2_b.detach(), self.alpha.detach())

    def load(self, weights: Any, where: str) -> None:
        if not isinstance(weights, LohaWeights):
            raise CheckpointError(f"{where}: {self.lora_name} is not a LoHa module; load it with its own "
                                  "--network_module (networks.lora*/networks.lokr)")
        found = weights.tensors()
        _copy_in(self, found, weights.alpha, where)

    def scale_weights(self, ratio: float) -> None:
        for param in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
            param.mul_(ratio**0.25)  # four factors share the ratio, as the reference

    def plus_parameters(self) -> list[nn.Parameter]:
        return [self.hada_w2_a, self.hada_w2_b]


class LoKrModule(AdapterModule):
    """LoKr for one original layer; see the module docstring."""

    def __init__(self, target: LoraTarget, rank: int, alpha: float | torch.Tensor | None, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, factor: int = -1):
        super().__init__(target, multiplier, None, None, module_dropout)  # only module dropout, as the reference
        self.factor = factor
        self.ignored_dropout = dropout is not None or rank_dropout is not None
        (out_l, out_k), (in_m, in_n) = factorization(target.out_features, factor), factorization(target.in_features, factor)
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        self.low_rank = 0 < rank < max(out_k, in_n)
        self.lora_dim = rank if self.low_rank else max(out_k, in_n)
        if self.low_rank:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n))
            nn.init.kaiming_uniform_(self.lokr_w2, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        alpha, self.scale = _alpha_and_scale(alpha, self.lora_dim)
        self.register_buffer("alpha", torch.tensor(alpha))

    def _w2(self) -> torch.Tensor:
        return self.lokr_w2_a @ self.lokr_w2_b if self.low_rank else self.lokr_w2

    def _per_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._skip_by_module_dropout():
            return None
        return x.to(self.lokr_w1.dtype), torch.kron(self.lokr_w1, self._w2())

    def _part_output(self, index: int, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, weight = state
        return F.linear(x, weight[self._row_slices[index]]) * (self.multiplier * self.scale)

    def _factors(self) -> list[nn.Parameter]:
        return [self.lokr_w1, self.lokr_w2_a, self.lokr_w2_b] if self.low_rank else [self.lokr_w1, self.lokr_w2]

    def weights(self) -> LokrWeights:
        if self.low_rank:
            return LokrWeights(self.lokr_w1.detach(), w2_a=self.lokr_w2_a.detach(), w2_b=self.lokr_w2_b.detach(),
                               alpha=self.alpha.detach())
        return LokrWeights(self.lokr_w1.detach(), w2=self.lokr_w2.detach(), alpha=self.alpha.detach())

    def load(self, weights: Any, where: str) -> None:
        if not isinstance(weights, LokrWeights) or weights.low_rank != self.low_rank:
            raise CheckpointError(f"{where}: {self.lora_name} is not a LoKr module of this form (low-rank w2: "
                                  f"{self.low_rank}); rebuild the network from the file with --dim_from_weights")
        found = {"lokr_w1": weights.w1}
        found.update({"lokr_w2_a": weights.w2_a, "lokr_w2_b": weights.w2_b} if self.low_rank else {"lokr_w2": weights.w2})
        _copy_in(self, found, weights.alpha, where)

    def scale_weights(self, ratio: float) -> None:
        share = ratio ** (1.0 / len(self._factors()))  # kron and matmul are multilinear: the factors share the ratio
        for param in self._factors():
            param.mul_(share)

    def plus_parameters(self) -> list[nn.Parameter]:
        return self._factors()[1:]


class _LycorisNetwork(LoRANetwork):
    def state_dict_reference(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The reference layout: `lora_unet_<name>.hada_*` / `.lokr_*` and `.alpha`, copied to CPU."""
        sd = lycoris_to_layout({m.original_name: m.weights() for m in self.loras}, "default", None)
        return {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else None, copy=True)
                for k, v in sd.items()}


class LoHaNetwork(_LycorisNetwork):
    module_class = LoHaModule
    kind = "LoHa"


class LoKrNetwork(_LycorisNetwork):
    module_class = LoKrModule
    kind = "LoKr"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if any(m.ignored_dropout for m in self.loras):
            logger.warning("LoKr uses only module_dropout (as the reference); --network_dropout and rank_dropout "
                           "are ignored")
        self.factor = (kwargs.get("module_kwargs") or {}).get("factor", -1)

    @classmethod
    def module_kwargs_from_args(cls, parsed_args: Mapping[str, Any]) -> dict[str, Any]:
        factor = parsed_args.get("factor")
        return {"factor": -1 if factor is None else factor}

    @classmethod
    def module_kwargs_from_weights(cls, canonical: Mapping[str, Any], targets: Sequence[LoraTarget],
                                   parsed_args: Mapping[str, Any]) -> dict[str, Any]:
        return {"factor": infer_factor(canonical, targets, parsed_args.get("factor"))}

    def state_dict_reference(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        sd = super().state_dict_reference(dtype)
        if self.factor != -1:  # the reference's record of a chosen factor (automatic needs none)
            sd[LOKR_FACTOR_KEY] = torch.tensor(self.factor, dtype=torch.int64)
        return sd


def _lokr_shapes(target: LoraTarget, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    (out_l, out_k), (in_m, in_n) = factorization(target.out_features, factor), factorization(target.in_features, factor)
    return (out_l, in_m), (out_k, in_n)


def infer_factor(canonical: Mapping[str, Any], targets: Sequence[LoraTarget], explicit: int | None) -> int:
    """The LoKr factor that gives every module of a file its shapes (automatic first, then the w2 sizes)."""
    by_name = {t.original_name: t for t in targets}
    found = {n: (tuple(w.w1.shape), tuple(w.w2_shape)) for n, w in canonical.items()}
    candidates = [explicit] if explicit is not None else [-1] + sorted({d for _, w2 in found.values() for d in w2})
    for factor in candidates:
        if all(_lokr_shapes(by_name[n], factor) == shapes for n, shapes in found.items()):
            return factor
    name, shapes = next(iter(found.items()))
    raise CheckpointError(f"LoKr module {name!r} has w1/w2 shapes {shapes}, which no single factor gives for this "
                          "model's layers; is the file for another model size?")


_CLASSES = {LoraWeights: LoRANetwork, LohaWeights: LoHaNetwork, LokrWeights: LoKrNetwork}


def network_class_for(canonical: Mapping[str, Any], where: str) -> type[LoRANetwork]:
    """LoRANetwork / LoHaNetwork / LoKrNetwork for a file's modules; a file mixing kinds is refused."""
    kinds = {_CLASSES[type(w)] for w in canonical.values()}
    if len(kinds) > 1:
        raise CheckpointError(f"{where} mixes {sorted(k.kind for k in kinds)} modules in one file; "
                              "load each kind from its own file")
    return kinds.pop() if kinds else LoRANetwork


def entry_points(network_class: type[LoRANetwork]):
    """`create_network` / `create_network_from_weights` of an architecture-independent `--network_module`
    (networks.loha, networks.lokr): the caller passes `arch=` (the training CLI does)."""

    def create(dit: nn.Module, network_dim: int | None, network_alpha: float | None,
               network_dropout: float | None = None, network_args: Any = None, multiplier: float = 1.0, *,
               arch: Any) -> LoRANetwork:
        return create_network(arch, dit, network_dim, network_alpha, network_dropout, network_args, multiplier,
                              network_class=network_class)

    def create_from_weights(dit: nn.Module, weights_sd: dict, multiplier: float = 1.0, *, arch: Any,
                            **kwargs: Any) -> LoRANetwork:
        network = create_network_from_weights(arch, dit, weights_sd, multiplier, **kwargs)
        if type(network) is not network_class:
            raise UserError(f"{kwargs.get('source') or 'the weights'} hold {network.kind} modules, not "
                            f"{network_class.kind}; use the matching --network_module")
        return network

    return create, create_from_weights
