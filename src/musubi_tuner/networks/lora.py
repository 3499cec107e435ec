"""LoRA modules attached to a diffusers DiT, named by the ORIGINAL checkpoint's layers.

A `LoRAModule` adapts one original layer (a `LoraTarget`): lora_down (rank x in), lora_up (out x rank) and an
`alpha` buffer, scale = alpha / rank; its state dict is the reference layout. It attaches by wrapping the forward
of each diffusers part (the base module's parameters and state-dict keys are untouched; `remove()` restores them).
For a fused original layer (several parts) the down projection is computed once per input and each part adds
its slice of the up projection, which is exactly the reference's fused parameterisation.

Dropouts follow the reference: `dropout` on the rank activations, `rank_dropout` masks whole ranks per sample
(and rescales by 1/(1-p)), `module_dropout` skips the module for a forward; all three only while training.
"""

from __future__ import annotations

import ast
import functools
import logging
import math
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from musubi_tuner.errors import CheckpointError, UserError
from musubi_tuner.networks.lora_formats import LoraWeights, NameIndex
from musubi_tuner.networks.lycoris_weights import parse_adapter_state_dict
from musubi_tuner.networks.targets import LoraTarget

logger = logging.getLogger(__name__)

DEFAULT_DIM = 4
DEFAULT_ALPHA = 1.0
KNOWN_NETWORK_ARGS = (
    "factor",  # LoKr only
    "exclude_patterns",
    "include_patterns",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "verbose",
)


class AdapterModule(nn.Module):
    """An adapter of one original layer (LoRA, LoHa, LoKr), attached over the layer's diffusers parts.

    Subclasses give the math: `_per_input(x)` (computed once per input and shared by the parts of a fused layer,
    with its dropout draws; None skips the module), `_part_output(index, state)` (what part `index` adds),
    `weights()` (the file form), `load(weights, where)`, `scale_weights(ratio)` (max-norm), and
    `plus_parameters()` (the LoRA+ group).
    """

    def __init__(self, target: LoraTarget, multiplier: float = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = target.lora_name
        self.original_name = target.original_name
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # A plain tuple, not submodules: the base layers must stay out of this module's parameters and state dict.
        self._target = target
        self._row_slices = [
            slice(sum(target.split_sizes[:i]), sum(target.split_sizes[: i + 1])) for i in range(len(target.parts))
        ]
        self._org_forwards: list[Any] | None = None
        self._saved_forward_attrs: list[Any] = []
        self._shared: tuple[weakref.ref, Any, set[int]] | None = None

    # ---- attaching ---------------------------------------------------------------------------------------------------
    @property
    def applied(self) -> bool:
        return self._org_forwards is not None

    def apply_to(self) -> None:
        """Wrap the forward of each part. Wrappers must be removed in reverse order of applying."""
        if self.applied:
            return
        self._org_forwards, self._saved_forward_attrs = [], []
        for i, part in enumerate(self._target.parts):
            module = part.module
            self._saved_forward_attrs.append(module.__dict__.get("forward"))  # an instance-level forward, if any
            self._org_forwards.append(module.forward)
            module.forward = functools.partial(self._part_forward, i)

    def remove(self) -> None:
        """Restore the parts' forwards."""
        if not self.applied:
            return
        for part, saved in zip(self._target.parts, self._saved_forward_attrs):
            if saved is None:
                part.module.__dict__.pop("forward", None)
            else:
                part.module.forward = saved
        self._org_forwards, self._saved_forward_attrs, self._shared = None, [], None

    # ---- forward -----------------------------------------------------------------------------------------------------
    def _skip_by_module_dropout(self) -> bool:
        return self.module_dropout is not None and self.training and bool(torch.rand(1) < self.module_dropout)

    def _per_input(self, x: torch.Tensor) -> Any:
        raise NotImplementedError(f"{type(self).__name__}._per_input")

    def _part_output(self, index: int, state: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}._part_output")

    def _shared_state(self, index: int, x: torch.Tensor) -> Any:
        # Parts of a fused layer see the same input tensor: compute the shared state (and its dropout draws) once.
        if len(self._row_slices) == 1:
            return self._per_input(x)
        shared = self._shared
        if shared is None or shared[0]() is not x or index in shared[2]:
            shared = (weakref.ref(x), self._per_input(x), set())  # weak: a stale entry must not keep x alive
            self._shared = shared
        shared[2].add(index)
        if len(shared[2]) == len(self._row_slices):
            self._shared = None  # every part served
        return shared[1]

    def _part_forward(self, index: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._org_forwards[index](x, *args, **kwargs)
        if self.multiplier == 0:
            return out
        state = self._shared_state(index, x)
        if state is None:
            return out
        return out + self._part_output(index, state).to(out.dtype)

    # ---- weights -----------------------------------------------------------------------------------------------------
    def weights(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.weights")

    def load(self, weights: Any, where: str) -> None:
        raise NotImplementedError(f"{type(self).__name__}.load")

    def scale_weights(self, ratio: float) -> None:
        raise NotImplementedError(f"{type(self).__name__}.scale_weights")

    def plus_parameters(self) -> list[nn.Parameter]:
        """The parameters LoRA+ trains at lr * loraplus_lr_ratio."""
        raise NotImplementedError(f"{type(self).__name__}.plus_parameters")

    @torch.no_grad()
    def merge_to_base(self, multiplier: float | None = None) -> None:
        """Add multiplier * delta into the parts' weights, each its rows (fp32 math, cast back)."""
        multiplier = self.multiplier if multiplier is None else multiplier
        delta = self.weights().delta() * multiplier
        for part, rows in zip(self._target.parts, self._row_slices):
            weight = part.module.weight
            weight.copy_((weight.float() + delta[rows].to(weight.device)).to(weight.dtype))


class LoRAModule(AdapterModule):
    """LoRA for one original layer; see the module docstring."""

    def __init__(
        self,
        target: LoraTarget,
        rank: int,
        alpha: float | torch.Tensor | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__(target, multiplier, dropout, rank_dropout, module_dropout)
        self.lora_dim = rank
        self.lora_down = nn.Linear(target.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, target.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(alpha) if alpha is not None else 0.0
        alpha = float(rank) if alpha == 0 else alpha  # alpha 0/None: no scaling
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / rank

    def _per_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """(rank activations, scale) for input x, or None when module dropout skips this forward."""
        if self._skip_by_module_dropout():
            return None
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            lx = lx * mask.view(lx.size(0), *([1] * (lx.dim() - 2)), self.lora_dim).to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        return lx, scale

    def _part_output(self, index: int, state: tuple[torch.Tensor, float]) -> torch.Tensor:
        lx, scale = state
        up = self.lora_up.weight if len(self._row_slices) == 1 else self.lora_up.weight[self._row_slices[index]]
        return F.linear(lx, up) * (self.multiplier * scale)

    # ---- weights -----------------------------------------------------------------------------------------------------
    def weights(self) -> LoraWeights:
        return LoraWeights(self.lora_down.weight.detach(), self.lora_up.weight.detach(), self.alpha.detach())

    def load(self, weights: LoraWeights, where: str) -> None:
        _load_module(self, weights, where)

    def scale_weights(self, ratio: float) -> None:
        self.lora_down.weight.mul_(ratio**0.5)
        self.lora_up.weight.mul_(ratio**0.5)

    def plus_parameters(self) -> list[nn.Parameter]:
        return [self.lora_up.weight]


class LoRANetwork(nn.Module):
    """The adapter modules of one DiT (LoRA by default; `module_class` LoHa/LoKr), registered under their reference
    names (`lora_unet_...`). The trainer, the sampler and the merges see only this interface."""

    module_class: type[AdapterModule] = LoRAModule
    kind = "LoRA"

    @classmethod
    def module_kwargs_from_args(cls, parsed_args: Mapping[str, Any]) -> dict[str, Any]:
        """Extra module arguments from `--network_args` (LoKr: factor)."""
        return {}

    @classmethod
    def module_kwargs_from_weights(cls, canonical: Mapping[str, Any], targets: Sequence[LoraTarget],
                                   parsed_args: Mapping[str, Any]) -> dict[str, Any]:
        """Extra module arguments that rebuild the modules of a file (LoKr: the factor its shapes imply)."""
        return cls.module_kwargs_from_args(parsed_args)

    def __init__(
        self,
        targets: Sequence[LoraTarget],
        dims: int | Mapping[str, int],
        alphas: float | Mapping[str, float | torch.Tensor | None] | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        loraplus_lr_ratio: float | None = None,
        module_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not targets:
            raise UserError(
                "no LoRA modules: every candidate layer was excluded; check --network_args exclude/include_patterns"
            )
        self.targets = list(targets)
        self.multiplier = multiplier
        self.loraplus_lr_ratio = loraplus_lr_ratio
        for t in self.targets:
            dim = dims[t.original_name] if isinstance(dims, Mapping) else dims
            alpha = alphas.get(t.original_name) if isinstance(alphas, Mapping) else alphas
            kwargs = dict(module_kwargs or {})
            module = self.module_class(t, dim, alpha, multiplier, dropout, rank_dropout, module_dropout, **kwargs)
            self.add_module(t.lora_name, module)

    @property
    def loras(self) -> list[AdapterModule]:
        return [m for m in self.children() if isinstance(m, AdapterModule)]

    def apply_to(self) -> None:
        """Attach every module to its DiT layers (training or live inference)."""
        for lora in self.loras:
            lora.apply_to()
        logger.info("LoRA applied to %d layers", len(self.loras))

    def remove(self) -> None:
        """Detach from the DiT; its forward is then the base model's again."""
        for lora in reversed(self.loras):
            lora.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    def merge_to_base(self, multiplier: float | None = None) -> None:
        """Bake the LoRA into the DiT's diffusers weights (for inference). Call on a detached network."""
        for lora in self.loras:
            lora.merge_to_base(multiplier)

    # ---- files -------------------------------------------------------------------------------------------------------
    def state_dict_reference(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The reference layout: `lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha`, copied to CPU."""
        return {k: v.detach().to("cpu", dtype=dtype, copy=True) for k, v in self.state_dict().items()}

    def load_weights(
        self, path_or_sd: str | os.PathLike | dict[str, torch.Tensor], source: str | None = None
    ) -> None:
        """Load a LoRA in any supported layout (reference, ComfyUI/other, diffusers).

        source: how messages name the weights (e.g. "--network_weights x.safetensors"); defaults to the path,
        or "the given state dict".
        Keys naming no module of this network raise a UserError listing a few; modules absent from the file keep
        their current weights (a warning says how many).
        """
        if isinstance(path_or_sd, dict):
            sd, where = path_or_sd, source or "the given state dict"
        else:
            from musubi_tuner.networks.lora_files import load_lora_file

            sd, where = load_lora_file(path_or_sd)[0], source or str(path_or_sd)
        canonical, unmatched = parse_adapter_state_dict(sd, NameIndex(targets=self.targets))
        if unmatched:
            stems = _module_stems(unmatched)
            raise CheckpointError(
                f"{where}: {len(stems)} LoRA module(s) match no layer of this network, e.g. {stems[:5]}; "
                "is it for another architecture, or were these layers excluded by --network_args patterns?"
            )
        by_name = {m.original_name: m for m in self.loras}
        for name, weights in canonical.items():
            by_name[name].load(weights, where)
        missing = len(by_name) - len(canonical)
        if missing:
            logger.warning("%d LoRA module(s) are not in %s and keep their initial weights", missing, where)

    # ---- optimizer ---------------------------------------------------------------------------------------------------
    def prepare_optimizer_params(self, lr: float, loraplus_lr_ratio: float | None = None) -> list[dict[str, Any]]:
        """Param groups: all weights at `lr`; with LoRA+ the `plus_parameters` (LoRA up, LoHa w2, LoKr w2) in a
        second group at lr * ratio. Order: every module's other weights, then every module's plus weights."""
        ratio = self.loraplus_lr_ratio if loraplus_lr_ratio is None else loraplus_lr_ratio
        self.requires_grad_(True)
        main, plus = [], []
        for lora in self.loras:
            plus_ids = {id(p) for p in lora.plus_parameters()}
            main += [p for p in lora.parameters() if id(p) not in plus_ids]
            plus += lora.plus_parameters()
        if ratio is None:
            return [{"params": main + plus, "lr": lr}]
        return [{"params": main, "lr": lr}, {"params": plus, "lr": lr * ratio}]

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device: torch.device | str) -> tuple[int, float, float]:
        """--scale_weight_norms: shrink modules whose scaled delta norm exceeds max_norm (the factors share the
        ratio: LoRA's two matrices by sqrt each, LoHa's four by the 4th root, as the reference).

        Returns (modules scaled, mean norm, max norm) after scaling, as the reference logs them.
        """
        scaled, norms = 0, []
        for lora in self.loras:
            norm = lora.weights().scaled_delta(1.0, device).norm()
            clamped = norm.clamp(min=max_norm / 2)
            ratio = (clamped.clamp(max=max_norm) / clamped).item()
            if ratio != 1:
                scaled += 1
                lora.scale_weights(ratio)
            norms.append(norm.item() * ratio)
        return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)


def _module_stems(unmatched: Sequence[str]) -> list[str]:
    """Unmatched entries as the file's module names (`lora_unet_...`), once each, without `.down`/`.up`/`.alpha`."""
    stems: dict[str, None] = {}
    for key in unmatched:
        stem, _, kind = key.rpartition(".")
        stems[stem if stem and kind in ("down", "up", "alpha") else key] = None
    return list(stems)


def _load_module(module: LoRAModule, weights: LoraWeights, where: str) -> None:
    if not isinstance(weights, LoraWeights):
        raise CheckpointError(f"{where}: {module.lora_name} is a {weights.kind} module, this network is "
                              "LoRA; use --network_module networks.loha / networks.lokr for such files")
    expected = (tuple(module.lora_down.weight.shape), tuple(module.lora_up.weight.shape))
    found = (tuple(weights.down.shape), tuple(weights.up.shape))
    if expected != found:
        hint = (
            "use --dim_from_weights"
            if found[0][1:] == expected[0][1:] and found[1][:1] == expected[1][:1]
            else "wrong model?"
        )
        raise CheckpointError(
            f"{where}: {module.lora_name} has shapes {found}, the network expects {expected} ({hint})"
        )
    module.lora_down.weight.data.copy_(weights.down)
    module.lora_up.weight.data.copy_(weights.up)
    alpha = float(weights.alpha) if weights.alpha is not None else 0.0
    alpha = float(module.lora_dim) if alpha == 0 else alpha
    module.alpha.fill_(alpha)
    module.scale = alpha / module.lora_dim


# ---------------------------------------------------------------------------------------------------------------------
# construction


def parse_network_args(network_args: list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """`--network_args k=v ...` (or a dict) -> typed values; patterns are Python list literals."""
    if network_args is None:
        raw: dict[str, Any] = {}
    elif isinstance(network_args, Mapping):
        raw = dict(network_args)
    else:
        raw = {}
        for arg in network_args:
            if "=" not in arg:
                raise UserError(f"--network_args {arg!r}: expected key=value")
            key, value = arg.split("=", 1)
            raw[key.strip()] = value.strip()
    unknown = sorted(set(raw) - set(KNOWN_NETWORK_ARGS))
    if unknown:
        logger.warning("--network_args %s ignored; known keys: %s", unknown, ", ".join(KNOWN_NETWORK_ARGS))
    parsed: dict[str, Any] = {"verbose": _as_bool(raw.get("verbose", False))}
    for key in ("exclude_patterns", "include_patterns"):
        parsed[key] = _as_patterns(key, raw.get(key))
    for key in ("rank_dropout", "module_dropout", "loraplus_lr_ratio"):
        parsed[key] = _as_float(f"--network_args {key}", raw.get(key))
    factor = _as_float("--network_args factor", raw.get("factor"))
    if factor is not None and factor != int(factor):
        raise UserError(f"--network_args factor={raw['factor']!r}: expected a whole number (-1 = automatic)")
    parsed["factor"] = None if factor is None else int(factor)
    return parsed


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes", "on")


def _as_float(key: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r}: expected a number") from None


def _as_patterns(key: str, value: Any) -> list[re.Pattern] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise UserError(
                f"--network_args {key}: expected a Python list like {key}=[r'.*ffn.*'], got {value!r}"
            ) from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"--network_args {key}: expected a list of regex strings, got {value!r}")
    patterns = []
    for pattern in value:
        try:
            patterns.append(re.compile(pattern))
        except re.error as exc:
            raise UserError(f"--network_args {key}: invalid regex {pattern!r}: {exc}") from None
    return patterns


def select_targets(arch: Any, candidates: Sequence[LoraTarget], parsed_args: Mapping[str, Any]) -> list[LoraTarget]:
    """Apply the reference's filter: excluded (full match) unless re-included by an include pattern.

    Excludes = the user's `exclude_patterns` (or, when none is given, the arch's `lora_default_excludes_if_unset`)
    plus the arch's always-on `lora_default_excludes`.
    """
    user = parsed_args.get("exclude_patterns")
    excludes = (
        list(user) if user is not None else [re.compile(p) for p in getattr(arch, "lora_default_excludes_if_unset", ())]
    )
    excludes += [re.compile(p) for p in getattr(arch, "lora_default_excludes", ())]
    includes = parsed_args.get("include_patterns") or []
    selected = []
    for target in candidates:
        name = target.original_name
        if any(p.fullmatch(name) for p in excludes) and not any(p.fullmatch(name) for p in includes):
            if parsed_args.get("verbose"):
                logger.info("exclude: %s", name)
            continue
        selected.append(target)
    return selected


def _resolve_arch(arch: Any) -> Any:
    if isinstance(arch, str):
        from musubi_tuner.architectures import get_architecture

        return get_architecture(arch)
    return arch


def create_network(
    arch: Any,
    dit: nn.Module,
    network_dim: int | None,
    network_alpha: float | None,
    network_dropout: float | None = None,
    network_args: list[str] | Mapping[str, Any] | None = None,
    multiplier: float = 1.0,
    network_class: type[LoRANetwork] = LoRANetwork,
) -> LoRANetwork:
    """A new LoRA (or `network_class`: LoHa, LoKr) for `dit` (arch: Architecture or its name).
    Defaults as the reference: dim 4, alpha 1."""
    arch = _resolve_arch(arch)
    parsed = parse_network_args(network_args)
    targets = select_targets(arch, arch.lora_candidates(dit), parsed)
    dim = DEFAULT_DIM if network_dim is None else int(network_dim)
    alpha = DEFAULT_ALPHA if network_alpha is None else float(network_alpha)
    network = network_class(
        targets, dim, alpha, multiplier, _as_float("--network_dropout", network_dropout),
        parsed["rank_dropout"], parsed["module_dropout"], parsed["loraplus_lr_ratio"],
        module_kwargs=network_class.module_kwargs_from_args(parsed),
    )  # fmt: skip
    logger.info("%s: %d modules, dim %d, alpha %s", network_class.kind, len(targets), dim, alpha)
    if parsed["verbose"]:
        for t in targets:
            logger.info("\t%s", t.lora_name)
    return network


def create_network_from_weights(
    arch: Any,
    dit: nn.Module,
    weights_sd: dict[str, torch.Tensor],
    multiplier: float = 1.0,
    network_dropout: float | None = None,
    network_args: list[str] | Mapping[str, Any] | None = None,
    source: str | None = None,
) -> LoRANetwork:
    """A network shaped like `weights_sd` (any layout; LoRA, LoHa or LoKr by its keys): its modules, ranks and
    alphas (for --dim_from_weights and inference). Weights are not loaded; call `load_weights`. Keys naming no
    layer of `dit` raise a UserError.

    source: how messages name the weights, e.g. "--network_weights x.safetensors" (default "the LoRA").
    """
    from musubi_tuner.networks.lycoris import network_class_for

    arch = _resolve_arch(arch)
    candidates = arch.lora_candidates(dit)
    canonical, unmatched = parse_adapter_state_dict(weights_sd, NameIndex(targets=candidates))
    if unmatched:
        stems = _module_stems(unmatched)
        raise CheckpointError(
            f"{source or 'the LoRA'}: {len(stems)} LoRA module(s) match no layer of this {arch.name} model, "
            f"e.g. {stems[:5]}; is it a LoRA for another architecture?"
        )
    network_class = network_class_for(canonical, source or "the LoRA")
    parsed = parse_network_args(network_args)
    targets = [t for t in candidates if t.original_name in canonical]
    dims = {n: w.rank for n, w in canonical.items()}
    alphas = {n: (w.alpha if w.alpha is not None else float(w.rank)) for n, w in canonical.items()}
    return network_class(
        targets, dims, alphas, multiplier, _as_float("--network_dropout", network_dropout),
        parsed["rank_dropout"], parsed["module_dropout"], parsed["loraplus_lr_ratio"],
        module_kwargs=network_class.module_kwargs_from_weights(canonical, targets, parsed),
    )  # fmt: skip


def architecture_entry_points(architecture: str):
    """`create_network` / `create_network_from_weights` bound to one architecture, for the
    reference-named `--network_module` modules (`networks.lora_wan`, `networks.lora_flux`)."""

    def create(dit: nn.Module, network_dim: int | None, network_alpha: float | None,
               network_dropout: float | None = None, network_args: Any = None, multiplier: float = 1.0) -> LoRANetwork:
        return create_network(architecture, dit, network_dim, network_alpha, network_dropout, network_args, multiplier)

    def create_from_weights(dit: nn.Module, weights_sd: dict, multiplier: float = 1.0, **kwargs: Any) -> LoRANetwork:
        return create_network_from_weights(architecture, dit, weights_sd, multiplier, **kwargs)

    return create, create_from_weights
