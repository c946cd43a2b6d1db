"""PEFT LoRA adapters on the native decoder (`toxtests.engines.torch.gemma3`), without
importing PEFT (which imports transformers: ~2 s of a small gate on a 2-core CPU).

Each targeted linear layer keeps its base weight and, per adapter, the packed merged
weight `W + scaling * B @ A`, computed as PEFT computes its delta. That is the weight the
transformers path runs for an adapter on the CPU too (`packed.merge_adapter_layers`), so
both paths give the same bits; an identity adapter (B = 0) merges to W exactly and gives
the parent's text. The parent and adapters share forward passes row by row through
`packed.routed_rows`, as on the transformers path.

`unsupported` names what in an adapter this does not do (DoRA, trained `modules_to_save`,
LoRA on embeddings or the output layer, rank or alpha patterns, ...): such adapters load
through PEFT on the transformers model instead.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toxtests.engines.torch import packed

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json keys that must be empty (or false) for a plain LoRA this applies.
MUST_BE_EMPTY = (
    "use_dora",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "lora_bias",
    "fan_in_fan_out",
    "megatron_config",
)
# The linear layers of a decoder layer a native LoRA may target.
TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(directory: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def unsupported(spec: str) -> str | None:
    """Why the adapter in directory `spec` needs PEFT, or None where this applies it."""
    directory = Path(spec)
    if not (directory / WEIGHTS).is_file():
        return "no adapter_model.safetensors"
    config = _config(directory)
    if config is None:
        return "no readable adapter_config.json"
    if config.get("peft_type") != "LORA":
        return f"peft_type {config.get('peft_type')!r}"
    if config.get("bias", "none") != "none":
        return f"bias {config.get('bias')!r}"
    for key in MUST_BE_EMPTY:
        if config.get(key):
            return f"{key} is set"
    targets = config.get("target_modules")
    if not targets or not isinstance(targets, (list, str)):
        return "target_modules is not a list or pattern"
    if isinstance(targets, list):
        outside = [t for t in targets if str(t).rpartition(".")[2] not in TARGETABLE]
        if outside:
            return f"it targets {outside[0]}"
    elif any(re.fullmatch(targets, name) for name in ("lm_head", "model.embed_tokens")):
        return "it targets the embeddings or the output layer"
    try:
        int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        return "r or lora_alpha missing"
    return None


def scaling(config: dict[str, Any]) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def targeted(name: str, targets: list[str] | str) -> bool:
    """Whether PEFT's `target_modules` selects the module called `name`: a pattern
    matches the whole name, a list entry the name or its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


class LoraLinear(nn.Module):
    """A linear layer with merged LoRA weights per adapter, chosen per forward: the rows
    `packed.routed_rows` gives each variant, or the model's active adapter (None: W)."""

    def __init__(self, base_layer: nn.Linear, owner: Any):
        super().__init__()
        self.base_layer = base_layer
        self.merged: dict[str, torch.Tensor] = {}
        # (A, B, scale) of adapters not merged yet: merged at their first product, so a
        # run whose rows of an adapter are all cached never pays for its merge.
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._owner = weakref.ref(owner)  # not a submodule, and no reference cycle

    def add(self, adapter: str, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        """Take `adapter`'s A and B, checked against this layer's size, to merge into a
        packed copy of W + scale * B @ A when the adapter is first used (`weight`)."""
        base = self.base_layer
        if (
            lora_a.dim() != 2
            or lora_b.dim() != 2
            or lora_a.shape[1] != base.in_features
            or lora_b.shape[0] != base.out_features
            or lora_a.shape[0] != lora_b.shape[1]
        ):
            raise ValueError(
                f"size mismatch: lora_A {tuple(lora_a.shape)} and lora_B "
                f"{tuple(lora_b.shape)} for a {base.in_features} -> {base.out_features} layer"
            )
        self.merged.pop(adapter, None)
        self.pending[adapter] = (lora_a, lora_b, scale)

    def weight(self, adapter: str) -> torch.Tensor | None:
        """`adapter`'s packed merged weight, merged now if it was not yet (PEFT's
        `get_delta_weight` for a float32 layer, so the same bits); None if the adapter
        does not touch this layer."""
        if adapter not in self.merged:
            if adapter not in self.pending:
                return None
            lora_a, lora_b, scale = self.pending.pop(adapter)
            with torch.no_grad():
                weight = self.base_layer.weight + (lora_b.float() @ lora_a.float()) * scale
            self.merged[adapter] = packed.pack(weight)
        return self.merged[adapter]

    def _product(self, inputs: torch.Tensor, adapter: str | None) -> torch.Tensor:
        merged = None if adapter is None else self.weight(adapter)
        if merged is None:
            return self.base_layer(inputs)  # type: ignore[no-any-return]
        return packed.linear(inputs, merged, self.base_layer.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        routes = packed.current_routes()
        if routes is None:
            owner = self._owner()
            return self._product(inputs, None if owner is None else owner.active_adapter)
        return packed.route(inputs, routes, self._product)


def attach(model: Any, spec: str, adapter: str) -> None:
    """Load the LoRA in directory `spec` onto the native `model` as `adapter`.

    Raises ValueError naming the weight at fault where the adapter does not fit the
    model (it was trained on another base)."""
    from safetensors.torch import load_file

    directory = Path(spec)
    config = _config(directory)
    if config is None or unsupported(spec) is not None:
        raise ValueError(f"{spec}: not a LoRA the native decoder applies")
    scale = scaling(config)
    targets = config["target_modules"]
    weights = load_file(str(directory / WEIGHTS))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key.removeprefix(PREFIX))
        if match is None or not key.startswith(PREFIX):
            raise ValueError(f"{spec}: unexpected weight {key} (not a LoRA A or B matrix)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    layers = _targetable_layers(model)
    if isinstance(targets, list):
        for target in targets:
            if not any(targeted(name, [target]) for name in layers):
                raise ValueError(f"{spec}: target module {target} not found in the base model")
    for name, pair in pairs.items():
        if name not in layers or not targeted(name, targets):
            raise ValueError(f"{spec}: weight for {name}, not a linear layer this model has")
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{spec}: {name} has lora_{next(iter(pair))} without its pair")
    for name in pairs:
        layer = _wrapped(model, name, layers[name])
        try:
            layer.add(adapter, pairs[name]["A"], pairs[name]["B"], scale)
        except ValueError as exc:
            raise ValueError(f"{spec}: {name}: {exc}") from None
    model.adapter_names.append(adapter)


def _targetable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every decoder layer's linear layers (wrapped or not), by their module names."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in TARGETABLE and ".layers." in f".{name}"
    }


def _wrapped(model: nn.Module, name: str, module: nn.Module) -> LoraLinear:
    """The layer `name` as a `LoraLinear`, wrapping its `nn.Linear` the first time."""
    if isinstance(module, LoraLinear):
        return module
    owner, _, attribute = name.rpartition(".")
    wrapper = LoraLinear(module, model)  # type: ignore[arg-type]
    setattr(model.get_submodule(owner), attribute, wrapper)
    return wrapper
