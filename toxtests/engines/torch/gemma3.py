"""Gemma 3's text decoder in plain torch, for the CPU decode loop, without transformers.

Importing transformers and Gemma's modelling code is ~2 s of a 128-prompt gate's
~4.5 s outside generation on a 2-core CPU, for a forward of a few dozen lines. Here is
that forward, op for op as transformers 5 writes it (the tests compare the two bit for
bit, padded batches and decode steps included), so a gate gives the same text and the
same cache keys either way. The decoder always attends through `attention.row_attention`
(each row over its own positions), the one attention the decode loop uses on a CPU.

Only what the decode loop runs is here: float32 on the CPU, the default RoPE, causal
attention, no attention soft cap. `native_config` says whether a model directory is one
of these; everything else loads through transformers (`toxtests.engines.torch.load`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toxtests.engines.torch.attention import LAYOUT_KEYWORD, RowLayout, row_attention
from toxtests.engines.torch.kv_cache import KVCache

MODEL_TYPES = ("gemma3_text",)
ACTIVATIONS = ("gelu_pytorch_tanh",)


@dataclass(frozen=True)
class TextConfig:
    """What the decoder needs from config.json (transformers' `Gemma3TextConfig`)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    query_pre_attn_scalar: float
    sliding_window: int | None
    layer_types: tuple[str, ...]
    rope_thetas: dict[str, float]
    final_logit_softcapping: float | None
    pad_token_id: int | None
    eos_token_id: Any
    tie_word_embeddings: bool
    model_type: str = "gemma3_text"
    attn_logit_softcapping: None = None  # refused by `native_config`


def _rope_thetas(raw: dict[str, Any], layer_types: tuple[str, ...]) -> dict[str, float] | None:
    """Each layer type's RoPE base, where every one is the default (unscaled) RoPE:
    transformers 5's `rope_parameters`, or the older `rope_theta` and
    `rope_local_base_freq` without `rope_scaling`."""
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, dict) and all(kind in parameters for kind in layer_types):
        thetas = {}
        for kind in set(layer_types):
            entry = parameters[kind]
            if not isinstance(entry, dict) or entry.get("rope_type", "default") != "default":
                return None
            thetas[kind] = float(entry["rope_theta"])
        return thetas
    if parameters is not None or raw.get("rope_scaling") is not None:
        return None
    if "rope_theta" not in raw or "rope_local_base_freq" not in raw:
        return None
    return {
        "full_attention": float(raw["rope_theta"]),
        "sliding_attention": float(raw["rope_local_base_freq"]),
    }


def native_config(directory: str | Path) -> TextConfig | None:
    """The model's config where this decoder computes exactly what transformers would,
    else None (another architecture, a quantized or scaled-RoPE model, bidirectional
    attention, an attention soft cap, weights not in safetensors, ...)."""
    directory = Path(directory)
    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("model_type") not in MODEL_TYPES:
        return None
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        return None
    if raw.get("quantization_config") or raw.get("auto_map"):
        return None
    if raw.get("use_bidirectional_attention") or raw.get("attention_bias"):
        return None
    if raw.get("attn_logit_softcapping") is not None:
        return None
    if raw.get("hidden_activation", "gelu_pytorch_tanh") not in ACTIVATIONS:
        return None
    # Keys whose absence would mean transformers' class defaults: rather than repeat
    # those here, a config without them loads through transformers (transformers writes
    # them all when it saves a Gemma 3).
    stated = ("head_dim", "num_key_value_heads", "query_pre_attn_scalar", "rms_norm_eps")
    if any(key not in raw for key in (*stated, "sliding_window", "max_position_embeddings")):
        return None
    try:
        layers = int(raw["num_hidden_layers"])
        layer_types = tuple(raw["layer_types"])
        if len(layer_types) != layers or not set(layer_types) <= {
            "full_attention",
            "sliding_attention",
        }:
            return None
        thetas = _rope_thetas(raw, layer_types)
        if thetas is None:
            return None
        softcap = raw.get("final_logit_softcapping")
        window = raw["sliding_window"]
        return TextConfig(
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(raw["num_key_value_heads"]),
            head_dim=int(raw["head_dim"]),
            rms_norm_eps=float(raw["rms_norm_eps"]),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            query_pre_attn_scalar=float(raw["query_pre_attn_scalar"]),
            sliding_window=None if window is None else int(window),
            layer_types=layer_types,
            rope_thetas=thetas,
            final_logit_softcapping=None if softcap is None else float(softcap),
            pad_token_id=raw.get("pad_token_id"),
            eos_token_id=_generation_eos(directory, raw.get("eos_token_id")),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        )
    except (KeyError, TypeError, ValueError):
        return None


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _generation_eos(directory: Path, configured: Any) -> Any:
    """The EOS ids generation stops at: generation_config.json's where it names them (a
    chat model's end-of-turn token too), as transformers reads them, else config.json's."""
    try:
        generation = json.loads((directory / "generation_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return configured
    found = generation.get("eos_token_id") if isinstance(generation, dict) else None
    return configured if found is None else found


class RMSNorm(nn.Module):
    """Gemma's RMS norm: computed in float32, scaled by (1 + weight)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _placeholder(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = x.float()
        output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + self.eps)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class GELUTanh(nn.Module):
    """The tanh GELU (`gelu_pytorch_tanh`); its class name is what `packed.
    fuse_gated_mlps` recognises to fuse it into the gate projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def _linear(inputs: int, outputs: int) -> nn.Linear:
    """An `nn.Linear` without bias whose weight `load` fills in: no initialisation (a
    random init of the 262k x 640 embedding alone took ~1 s, on the meta device too)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = inputs, outputs
    layer.weight = _placeholder(outputs, inputs)
    layer.register_parameter("bias", None)
    return layer


def _placeholder(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size)
        self.act_fn = GELUTanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.head_dim = config.head_dim
        self.scaling = config.query_pre_attn_scalar**-0.5
        sliding = config.layer_types[layer] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = _linear(config.hidden_size, heads * config.head_dim)
        self.k_proj = _linear(config.hidden_size, kv_heads * config.head_dim)
        self.v_proj = _linear(config.hidden_size, kv_heads * config.head_dim)
        self.o_proj = _linear(heads * config.head_dim, config.hidden_size)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
        layout: RowLayout,
    ) -> torch.Tensor:
        input_shape = hidden.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        query = self.q_norm(self.q_proj(hidden).view(shape).transpose(1, 2))
        key = self.k_norm(self.k_proj(hidden).view(shape).transpose(1, 2))
        value = self.v_proj(hidden).view(shape).transpose(1, 2)
        cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
        query = (query * cos) + (rotate_half(query) * sin)
        key = (key * cos) + (rotate_half(key) * sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer)
        layout_argument: dict[str, Any] = {LAYOUT_KEYWORD: layout}
        out, _ = row_attention(
            self,
            query,
            key,
            value,
            None,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **layout_argument,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())  # type: ignore[no-any-return]


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps)
        self.post_attention_layernorm = RMSNorm(size, eps)
        self.pre_feedforward_layernorm = RMSNorm(size, eps)
        self.post_feedforward_layernorm = RMSNorm(size, eps)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
        layout: RowLayout,
    ) -> torch.Tensor:
        residual = hidden
        hidden = self.self_attn(self.input_layernorm(hidden), rope, cache, layout)
        hidden = residual + self.post_attention_layernorm(hidden)
        residual = hidden
        hidden = self.mlp(self.pre_feedforward_layernorm(hidden))
        return residual + self.post_feedforward_layernorm(hidden)  # type: ignore[no-any-return]


class _CacheNames:
    """The KV cache under both names transformers has used for it."""

    cache: KVCache | None

    @property
    def past_key_values(self) -> KVCache | None:
        return self.cache


@dataclass
class DecoderOutput(_CacheNames):
    last_hidden_state: torch.Tensor
    cache: KVCache | None


@dataclass
class CausalLMOutput(_CacheNames):
    logits: torch.Tensor
    cache: KVCache | None


def layout_from_mask(attention_mask: torch.Tensor | None, rows: int, width: int) -> RowLayout:
    """Each row's first real position, from a left-padded mask over all `width`
    positions (None: no padding)."""
    if attention_mask is None:
        return RowLayout((0,) * rows, width)
    mask = attention_mask.to(torch.long)
    if mask.shape != (rows, width):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, expected {(rows, width)} "
            "(cached positions and new tokens)"
        )
    lengths = mask.sum(-1)
    positions = torch.arange(width, device=mask.device)
    expected = (positions >= (width - lengths).unsqueeze(-1)).to(torch.long)
    if not torch.equal(mask, expected):
        raise ValueError("attention_mask must be left-padded (zeros, then ones) on every row")
    return RowLayout.left_padded(lengths.tolist(), width)


class TextModel(nn.Module):
    """The decoder: embeddings, layers, final norm (transformers' `Gemma3TextModel`)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            config.pad_token_id,
            _weight=_placeholder(config.vocab_size, config.hidden_size),
            _freeze=True,
        )
        # float32, as transformers' buffer: sqrt(640) rounded once to float32.
        self.embed_scale = torch.tensor(config.hidden_size**0.5)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, layer) for layer in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        dim = config.head_dim
        steps = torch.arange(0, dim, 2, dtype=torch.float)
        self.inv_freq = {
            kind: 1.0 / (theta ** (steps / dim)) for kind, theta in config.rope_thetas.items()
        }

    def _rope(
        self, kind: str, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq[kind].to(device=hidden.device, dtype=torch.float)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * 1.0).to(hidden.dtype), (emb.sin() * 1.0).to(hidden.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        use_cache: bool = True,
        past_key_values: KVCache | None = None,
        **kwargs: Any,
    ) -> DecoderOutput:
        layout: RowLayout | None = kwargs.pop(LAYOUT_KEYWORD, None)
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = KVCache(self.config.num_hidden_layers)
        rows, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(length, device=input_ids.device) + past).unsqueeze(0)
        if layout is None:
            layout = layout_from_mask(attention_mask, rows, past + length)
        weight = self.embed_tokens.weight
        hidden = F.embedding(input_ids, weight, self.embed_tokens.padding_idx)
        hidden = hidden * self.embed_scale.to(device=weight.device, dtype=weight.dtype)
        ropes = {kind: self._rope(kind, hidden, position_ids) for kind in self.inv_freq}
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, ropes[self.config.layer_types[index]], cache, layout)
        return DecoderOutput(self.norm(hidden), cache)


@dataclass
class GenerationSettings:
    """The model's own generation defaults the decode loop reads (its EOS ids)."""

    eos_token_id: Any = None


class CausalLM(nn.Module):
    """The decoder and its (tied) output layer (transformers' `Gemma3ForCausalLM`), with
    LoRA adapters switched in by name (`toxtests.engines.torch.lora`)."""

    toxtests_native = True  # what the decode loop checks to skip transformers' hooks

    def __init__(self, config: TextConfig, name_or_path: str = ""):
        super().__init__()
        self.config = config
        self.name_or_path = name_or_path
        self.model = TextModel(config)
        self.lm_head = _linear(config.hidden_size, config.vocab_size)
        self.generation_config = GenerationSettings(config.eos_token_id)
        self.active_adapter: str | None = None
        self.adapter_names: list[str] = []

    def get_decoder(self) -> TextModel:
        return self.model

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_adapter(self, name: str) -> None:
        if name not in self.adapter_names:
            raise ValueError(f"adapter {name!r} is not loaded (loaded: {self.adapter_names})")
        self.active_adapter = name

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The parent: every LoRA layer runs its base weight for the duration."""
        before, self.active_adapter = self.active_adapter, None
        try:
            yield
        finally:
            self.active_adapter = before

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        past_key_values: KVCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            cache if cache is not None else past_key_values,
            use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        logits = self.lm_head(hidden)
        softcap = self.config.final_logit_softcapping
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return CausalLMOutput(logits, out.cache)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [directory / name for name in sorted(set(names))]
    return [directory / "model.safetensors"]


def load(directory: str | Path, config: TextConfig | None = None) -> CausalLM:
    """The model in `directory` (config.json and safetensors weights), in float32.

    Raises ValueError naming the first weight that is missing, unexpected or of the
    wrong shape: a directory `native_config` accepts but this decoder cannot hold."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = config or native_config(directory)
    if config is None:
        raise ValueError(f"{directory}: not a model the native Gemma 3 decoder supports")
    model = CausalLM(config, str(directory))
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        state.update(load_file(str(path)))
    expected = {name: parameter for name, parameter in model.named_parameters()}
    tied = config.tie_word_embeddings
    if tied:  # the output layer is the embedding matrix, whatever the file also holds
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        what = f"unexpected weight {unexpected[0]}" if unexpected else f"missing {missing[0]}"
        raise ValueError(f"{directory}: {what}")
    for name, parameter in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != tuple(parameter.shape):
            raise ValueError(
                f"{directory}: {name} has shape {tuple(tensor.shape)}, the config says "
                f"{tuple(parameter.shape)}"
            )
        owner, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, attribute, nn.Parameter(tensor.float(), requires_grad=False))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
