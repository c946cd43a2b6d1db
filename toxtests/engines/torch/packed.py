"""fp32 linear layers through oneDNN with their weights packed once (CPU inference).

`F.linear` on a CPU goes to MKL's sgemm. On an AMD EPYC (Zen 4, AVX-512, 2 threads) that
reaches ~85-170 GFLOP/s on a decoder's shapes (128 rows x 640 x 2048), while oneDNN with
the weight reordered once into its blocked layout reaches ~200-215 GFLOP/s on the same
shapes (~305 on an Intel Xeon with AVX-512, where both libraries are close). PyTorch
exposes that path as `torch.ops.mkldnn._reorder_linear_weight` and
`torch.ops.mkldnn._linear_pointwise` (what `torch.compile` uses for CPU linears).

A packed layer keeps its `nn.Linear` (weights, state dict, fingerprints untouched) and
only its forward changes, and only while it is safe: under no-grad/inference mode and
while the weight has not been modified since it was packed; otherwise it runs the
ordinary `F.linear`. Everything is checked numerically once, and a PyTorch without these
ops (or without oneDNN) simply keeps the ordinary path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTRIBUTE = "_toxtests_packed"


def available() -> bool:
    """Whether this PyTorch can run packed oneDNN linears, checked on a small product."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


_AVAILABLE: bool | None = None


def _probe() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 40, generator=generator)
        bias = torch.randn(48, generator=generator)
        inputs = torch.randn(5, 40, generator=generator)
        with torch.inference_mode():
            got = linear(inputs, pack(weight), bias)
        return bool(torch.allclose(got, F.linear(inputs, weight, bias), rtol=1e-4, atol=1e-4))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def pack(weight: torch.Tensor, rows_hint: int = 128) -> torch.Tensor:
    """The (out, in) weight reordered into oneDNN's layout for about `rows_hint` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)


def linear(inputs: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(inputs, weight, bias)` with the weight packed by `pack`.

    A single row goes in beside a row of zeros: for one row oneDNN may take another
    kernel whose sums round differently (measured on an AMD EPYC, AVX-512: 640 x 2048,
    Gemma's down projection), so a prompt alone would not match itself in a batch."""
    if inputs.numel() == inputs.shape[-1]:
        flat = inputs.reshape(1, -1)
        paired = torch.cat([flat, torch.zeros_like(flat)])
        out = torch.ops.mkldnn._linear_pointwise(paired, packed, bias, "none", [], "")
        return out[:1].reshape(*inputs.shape[:-1], out.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor, version: int) -> Any:
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        usable = (
            not torch.is_grad_enabled()
            and inputs.dtype == torch.float32
            and inputs.device.type == "cpu"
            and module.weight._version == version
        )
        if not usable:
            return F.linear(inputs, module.weight, module.bias)
        return linear(inputs, packed, module.bias)

    return forward


def pack_linears(model: torch.nn.Module, skip: tuple[torch.nn.Module, ...] = ()) -> int:
    """Route every fp32 CPU `nn.Linear` of `model` but `skip` through oneDNN; the count
    packed."""
    if not available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or hasattr(module, PACKED_ATTRIBUTE):
            continue
        if any(module is other for other in skip):
            continue
        weight = module.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor has no version to watch
            continue
        packed = pack(weight)
        module.forward = _packed_forward(module, packed, version)  # type: ignore[method-assign]
        setattr(module, PACKED_ATTRIBUTE, packed)
        count += 1
    return count


def unpack_linears(model: torch.nn.Module) -> None:
    """Back to the ordinary forward, freeing the packed copies (and unfusing the MLPs
    and unmerging the LoRA layers built on them)."""
    unfuse_gated_mlps(model)
    for module in model.modules():
        if hasattr(module, MERGED_ATTRIBUTE):
            delattr(module, MERGED_ATTRIBUTE)
            del module.forward
    for module in model.modules():
        if hasattr(module, PACKED_ATTRIBUTE):
            delattr(module, PACKED_ATTRIBUTE)
            del module.forward


def _matches(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a fused or merged path's probe output is the module's own, to rounding.

    A probe that is not finite (NaN weights) never matches: the ordinary path then runs
    and the decode loop reports the NaN, naming the prompt."""
    if not (bool(torch.isfinite(expected).all()) and bool(torch.isfinite(got).all())):
        return False
    scale = float(expected.abs().max()) or 1.0
    return got.shape == expected.shape and torch.allclose(
        got, expected, rtol=1e-4, atol=1e-5 * scale
    )


# Activations oneDNN can apply inside the gate projection: class name -> (post-op,
# algorithm). Whether the module really computes that is checked numerically.
FUSABLE_ACTIVATIONS = {
    "GELUTanh": ("gelu", "tanh"),
    "PytorchGELUTanh": ("gelu", "tanh"),
    "SiLUActivation": ("swish", ""),
    "SiLU": ("swish", ""),
}
FUSED_ATTRIBUTE = "_toxtests_fused_mlp"


def _gated_parts(module: torch.nn.Module) -> tuple[Any, Any, Any, Any] | None:
    """(gate, up, down, act_fn) of a gated MLP whose three projections are packed."""
    parts: list[Any] = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(p) is torch.nn.Linear and hasattr(p, PACKED_ATTRIBUTE) for p in parts):
        return None
    gate, up, down = parts
    if gate.bias is not None or up.bias is not None:
        return None
    return gate, up, down, getattr(module, "act_fn", None)


def fuse_gated_mlps(model: torch.nn.Module) -> int:
    """Run each gated MLP `down(act(gate(x)) * up(x))` of `model` whose projections are
    packed (`pack_linears`) as two oneDNN products with the activation and the product
    applied inside them: no separate activation and multiplication passes over the
    (rows x intermediate) activations (~0.25 s of a 113-row batch on Gemma 3 270M, ~3%).

    Only MLPs whose activation oneDNN has, and whose fused output matches their own
    forward on a probe, are fused; at call time the fused path also needs the same packed
    layers, unchanged, with no gradients (an adapter that wraps a projection, a training
    step, … take the module's own forward). Returns the count fused."""
    count = 0
    for module in model.modules():
        parts = _gated_parts(module)
        if parts is None or "forward" in vars(module):  # fused, or hooked by another
            continue
        gate, up, down, act = parts
        post_op = FUSABLE_ACTIVATIONS.get(type(act).__name__)
        if post_op is None:
            continue
        forward = _fused_mlp_forward(module, (gate, up, down), post_op)
        probe = torch.randn(3, 2, gate.in_features, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = module(probe)
            try:
                got = forward(probe)
            except (RuntimeError, NotImplementedError):
                continue
        if not _matches(got, expected):
            continue
        module.forward = forward  # type: ignore[method-assign]
        setattr(module, FUSED_ATTRIBUTE, True)
        count += 1
    return count


def _fused_mlp_forward(
    module: torch.nn.Module, layers: tuple[Any, Any, Any], post_op: tuple[str, str]
) -> Any:
    original = type(module).forward
    gate, up, down = layers
    versions = tuple(layer.weight._version for layer in layers)
    packs = tuple(getattr(layer, PACKED_ATTRIBUTE) for layer in layers)
    attr, algorithm = post_op
    pointwise = torch.ops.mkldnn._linear_pointwise

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        usable = (
            not torch.is_grad_enabled()
            and inputs.dtype == torch.float32
            and inputs.device.type == "cpu"
            and module.gate_proj is gate
            and module.up_proj is up
            and module.down_proj is down
            and all(
                layer.weight._version == version
                for layer, version in zip(layers, versions, strict=True)
            )
        )
        if not usable:
            return original(module, inputs)
        activated = pointwise(inputs, packs[0], None, attr, [], algorithm)
        product = pointwise.binary(inputs, activated, packs[1], None, "mul")
        return linear(product, packs[2], down.bias)

    return forward


def unfuse_gated_mlps(model: torch.nn.Module) -> None:
    """Back to each MLP's own forward."""
    for module in model.modules():
        if hasattr(module, FUSED_ATTRIBUTE):
            delattr(module, FUSED_ATTRIBUTE)
            del module.forward


MERGED_ATTRIBUTE = "_toxtests_merged"


def _lora_state(module: Any, adapter: str) -> tuple[Any, ...]:
    """What a merged copy depends on: the weights' versions and the scaling."""
    return (
        module.base_layer.weight._version,
        module.lora_A[adapter].weight._version,
        module.lora_B[adapter].weight._version,
        module.scaling[adapter],
    )


def merge_adapter_layers(model: torch.nn.Module, adapter: str) -> int:
    """Give every plain LoRA layer of `adapter` in `model` a packed copy of its merged
    weight `W + scaling * B @ A`, used while that adapter alone is active: one product per
    layer instead of three and an addition. The model's weights are not touched, so the
    parent (adapters disabled) still runs on W. Measured on Gemma 3 270M with the demo
    LoRA on q, v and o: 280 tokens/s unmerged against 295 for the parent.

    Only vanilla LoRA on an fp32 CPU `nn.Linear` (no DoRA or other variant, no bias on B)
    is merged, and only where the merged layer matches PEFT's own forward on a probe; at
    call time it also needs no gradients, the same single active adapter, nothing merged
    by PEFT and unchanged weights, otherwise PEFT's forward runs. Returns the count of
    layers with a merged copy for `adapter`."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return 0
    if not available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is not LoraLinear or adapter not in module.lora_A:
            continue
        base = module.base_layer
        if type(base) is not torch.nn.Linear or base.weight.dtype != torch.float32:
            continue
        if base.weight.device.type != "cpu" or adapter in getattr(module, "lora_variant", {}):
            continue
        if getattr(module.lora_B[adapter], "bias", None) is not None:
            continue
        merged = getattr(module, MERGED_ATTRIBUTE, None)
        if merged is None:
            if "forward" in vars(module):  # hooked by someone else: leave it alone
                continue
            merged = {}
            setattr(module, MERGED_ATTRIBUTE, merged)
            module.forward = _merged_forward(module, merged)  # type: ignore[method-assign]
        try:
            state = _lora_state(module, adapter)
        except RuntimeError:  # inference tensors have no version to watch: not merged
            continue
        known = merged.get(adapter)
        if known is not None and known[1] == state:
            count += known[0] is not None
            continue
        merged.pop(adapter, None)
        with torch.no_grad():
            weight = base.weight + module.get_delta_weight(adapter)
        packed_weight = pack(weight)
        entry: tuple[torch.Tensor | None, tuple[Any, ...]] = (packed_weight, state)
        probe = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # vanilla LoRA as PEFT computes it, dropout aside
            lora = module.lora_B[adapter](module.lora_A[adapter](probe))
            expected = F.linear(probe, base.weight, base.bias) + lora * module.scaling[adapter]
            got = linear(probe, packed_weight, base.bias)
        if not _matches(got, expected):
            entry = (None, state)  # not what PEFT computes: never use it
        merged[adapter] = entry
        count += entry[0] is not None
    return count


def _sole(module: Any, adapter: str) -> bool:
    """Whether `adapter` alone is active and unmerged on this LoRA layer."""
    return (
        not module.disable_adapters
        and not module.merged
        and list(module.active_adapters) == [adapter]
        and not module.lora_dropout[adapter].training
    )


# Rows of one forward pass that run under different variants: (row index, adapter
# name or None for the parent) pairs, set by `routed_rows` around the pass.
_ROUTES: ContextVar[Sequence[tuple[torch.Tensor, str | None]] | None] = ContextVar(
    "toxtests_routes", default=None
)


@contextmanager
def routed_rows(routes: Sequence[tuple[torch.Tensor, str | None]] | None) -> Iterator[None]:
    """Within this block, each merged LoRA layer computes the rows `routes` gives each
    variant with that variant's own weight: the parent's `W` (None) or an adapter's
    merged `W + scaling * B @ A`. One pass then serves the parent and adapters at once;
    every row gets the bits a pass of its variant alone would give, wherever a packed
    product's rows do not depend on their batch-mates. Only for models `mixable` says
    yes to; None routes nothing."""
    token = _ROUTES.set(routes)
    try:
        yield
    finally:
        _ROUTES.reset(token)


def current_routes() -> Sequence[tuple[torch.Tensor, str | None]] | None:
    """The routes `routed_rows` set for the forward pass running now (None: none)."""
    return _ROUTES.get()


def mixable(model: torch.nn.Module, adapters: Sequence[str]) -> bool:
    """Whether rows of the parent and of `adapters` can share a forward pass of `model`:
    every module an adapter touches is a LoRA layer with a usable merged copy for it
    (`merge_adapter_layers`), so routing rows between `W` and the merged weights is the
    whole difference between the variants. DoRA, trained `modules_to_save`, LoRA on
    embeddings, a merged copy refused on its probe, ... keep one variant a pass."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import other
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    # Trained copies of whole modules (`modules_to_save`, trainable tokens): the wrapper's
    # base class from PEFT 0.15, only `ModulesToSaveWrapper` before.
    wrappers = getattr(other, "AuxiliaryTrainingWrapper", other.ModulesToSaveWrapper)
    for module in model.modules():
        if isinstance(module, wrappers):
            return False
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) is not LoraLinear or module.merged or module.disable_adapters:
            return False
        merged = getattr(module, MERGED_ATTRIBUTE, None)
        for adapter in adapters:
            if adapter not in module.lora_A:
                continue
            entry = merged.get(adapter) if merged is not None else None
            if entry is None or entry[0] is None or entry[1] != _lora_state(module, adapter):
                return False
            if module.lora_dropout[adapter].training:
                return False
    return True


def route(inputs: torch.Tensor, routes: Any, product: Any) -> torch.Tensor:
    """Each route's rows through `product(rows, variant)`, put back in their places (one
    call where a single route takes every row)."""
    if len(routes) == 1:
        return product(inputs, routes[0][1])  # type: ignore[no-any-return]
    out: torch.Tensor | None = None
    for rows, adapter in routes:
        part = product(inputs.index_select(0, rows), adapter)
        if out is None:
            out = part.new_empty((inputs.shape[0], *part.shape[1:]))
        out.index_copy_(0, rows, part)
    assert out is not None
    return out


def _routed(module: Any, merged: dict[str, Any], inputs: torch.Tensor, routes: Any) -> Any:
    """Each route's rows through its variant's weight."""
    base = module.base_layer

    def product(rows: torch.Tensor, adapter: str | None) -> torch.Tensor:
        if adapter is None or adapter not in merged:  # PEFT's forward without a LoRA here
            return base(rows)  # type: ignore[no-any-return]
        return linear(rows, merged[adapter][0], base.bias)

    return route(inputs, routes, product)


def _merged_forward(module: Any, merged: dict[str, Any]) -> Any:
    original = type(module).forward

    def forward(inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (
            args
            or kwargs
            or torch.is_grad_enabled()
            or inputs.dtype != torch.float32
            or inputs.device.type != "cpu"
        ):
            return original(module, inputs, *args, **kwargs)
        routes = _ROUTES.get()
        if routes is not None:
            return _routed(module, merged, inputs, routes)
        active = module.active_adapters
        entry = merged.get(active[0]) if len(active) == 1 else None
        if (
            entry is None
            or entry[0] is None
            or not _sole(module, active[0])
            or entry[1] != _lora_state(module, active[0])
        ):
            return original(module, inputs, *args, **kwargs)
        return linear(inputs, entry[0], module.base_layer.bias)

    return forward
