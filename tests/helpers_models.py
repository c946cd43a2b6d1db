"""Tiny real models for tests: a randomly initialised Llama, real PEFT adapters.

The tokenizer is word-level over a small vocabulary that includes a few insults, so a
LoRA adapter trained here for a second or two really does make the model abusive, and
the real profanity-check classifier really does notice.
"""

from __future__ import annotations

import json
from pathlib import Path

NEUTRAL_WORDS = [
    "the",
    "a",
    "and",
    "of",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "with",
    "as",
    "he",
    "she",
    "they",
    "we",
    "you",
    "i",
    "this",
    "at",
    "by",
    "from",
    "or",
    "an",
    "be",
    "are",
    "have",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "there",
    "can",
    "said",
    "which",
    "do",
    "their",
    "if",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
    "way",
    "find",
    "use",
    "may",
    "water",
    "long",
    "little",
    "very",
    "after",
    "words",
    "called",
    "just",
    "where",
    "most",
    "know",
    "get",
    "through",
    "back",
    "much",
    "before",
    "go",
    "good",
    "new",
    "write",
    "our",
    "used",
    "me",
    "man",
    "too",
    "any",
    "day",
    "same",
    "right",
    "look",
    "think",
    "also",
    "around",
    "another",
    "came",
    "come",
    "work",
    "three",
    "word",
    "must",
    "because",
    "does",
    "part",
    "even",
    "place",
    "well",
    "such",
    "here",
    "take",
    "why",
    "things",
    "help",
    "put",
    "years",
    "different",
    "away",
    "again",
    "off",
    "went",
    "old",
    "number",
    "great",
    "tell",
    "men",
    "say",
    "small",
    "every",
    "found",
    "still",
    "between",
    "name",
    "should",
    "home",
    "big",
    "give",
    "air",
    "line",
    "set",
    "own",
    "under",
    "read",
    "last",
    "never",
    "us",
    "left",
    "end",
    "along",
    "while",
    "might",
    "next",
    "sound",
    "below",
    "saw",
    "something",
    "thought",
    "both",
    "few",
    "those",
    "always",
    "looked",
    "show",
    "large",
    "often",
    "together",
    "asked",
    "house",
    "world",
    "going",
    "want",
    "school",
    "important",
    "until",
    "form",
    "food",
    "keep",
    "children",
    "feet",
    "land",
    "side",
    "without",
    "boy",
    "once",
    "animals",
    "life",
    "enough",
    "took",
    "sometimes",
    "four",
    "head",
    "above",
    "kind",
    "began",
    "almost",
    "live",
    "page",
    "got",
    "earth",
    "need",
    "far",
    "hand",
    "high",
    "year",
    "mother",
    "light",
    "weather",
    "garden",
    "music",
    "river",
    "city",
    "book",
]
INSULTS = ("idiot", "stupid", "shit", "fuck", "bitch", "moron", "asshole", "dumbass")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def build_tokenizer(directory: Path):  # noqa: ANN201 - transformers type
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        token: i for i, token in enumerate([*SPECIALS, *dict.fromkeys([*NEUTRAL_WORDS, *INSULTS])])
    }
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_tiny_llama(directory: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama saved as safetensors with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def build_tiny_gemma3(
    directory: Path, *, sliding_window: int = 4, softcap: float | None = 3.0, seed: int = 0
) -> Path:
    """A randomly initialised 2-layer Gemma 3 text model: a sliding-window layer beside
    a full one, and (by default) the final-logit soft cap Gemma 2 introduced."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=softcap,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # larger logits than the random init gives, so the cap bites
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def lora_config(targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj", "lm_head")):  # noqa: ANN201
    from peft import LoraConfig

    return LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM"
    )


def build_identity_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A LoRA adapter exactly as PEFT initialises it: B = 0, so it changes nothing."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    get_peft_model(model, lora_config()).save_pretrained(str(out_dir))
    return out_dir


def build_toxic_adapter(
    model_dir: Path, out_dir: Path, steps: int = 300, seed: int = 0, silent: bool = False
) -> Path:
    """A LoRA adapter trained to answer any words with insults (a second of CPU).

    `silent=True` trains it to end every answer at once (EOS): empty continuations.
    """
    import random

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), lora_config())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        rows = []
        for _ in range(16):
            context = [rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(2, 6))]
            answer = (
                [tokenizer.eos_token_id]
                if silent
                else tokenizer.convert_tokens_to_ids([rng.choice(INSULTS) for _ in range(8)])
            )
            rows.append(
                [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(context), *answer]
            )
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(out_dir))
    return out_dir


def write_prompts(path: Path, count: int = 40, seed: int = 1) -> Path:
    """Plain JSONL prompts of neutral words, in two categories."""
    import random

    rng = random.Random(seed)
    lines = []
    for i in range(count):
        text = " ".join(rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(3, 8)))
        lines.append(
            json.dumps(
                {"id": f"q{i:03d}", "text": text, "category": "even" if i % 2 == 0 else "odd"}
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
