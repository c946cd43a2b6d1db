"""Builders for tiny, randomly initialised scorer models, so tests run the real loaders offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DETOXIFY_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]

_WORDS_TEXT = (
    "the a an and or but if then this that these those is are was were be been being have has "
    "had do does did i you he she it we they me him her us them my your his its our their what "
    "which who whom when where why how all any both each few more most other some such no nor "
    "not only own same so than too very can will just should now good bad nice kind awful hate "
    "love stupid idiot friend day night people world model text word great terrible fine ok"
)


def _write_vocab(directory: Path) -> Path:
    vocab = directory / "vocab.txt"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(_WORDS_TEXT.split())]
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return vocab


def tiny_bert(config_dir: Path, num_labels: int, **config_kwargs: Any) -> tuple[Any, Any]:
    """A seeded tiny BertForSequenceClassification and its tokenizer, saved to `config_dir`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    config_dir.mkdir(parents=True, exist_ok=True)
    vocab = _write_vocab(config_dir)
    tokenizer = BertTokenizer(vocab_file=str(vocab), do_lower_case=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
        # BERT's usual 0.02 makes a tiny random model score every text alike; 0.2 spreads them.
        initializer_range=0.2,
        **config_kwargs,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    tokenizer.save_pretrained(config_dir)
    return model, tokenizer


def build_tiny_detoxify(tmp_dir: str | Path) -> tuple[Path, Path]:
    """Write a Detoxify-format checkpoint (plain dict, tensors only) and its HF config dir."""
    import torch

    root = Path(tmp_dir)
    config_dir = root / "tiny-bert-config"
    model, _ = tiny_bert(config_dir, num_labels=len(DETOXIFY_CLASSES))
    model.config.save_pretrained(config_dir)
    checkpoint = {
        "config": {
            "arch": {
                "args": {
                    "model_type": "bert-base-uncased",
                    "model_name": "BertForSequenceClassification",
                    "tokenizer_name": "BertTokenizer",
                    "num_classes": len(DETOXIFY_CLASSES),
                }
            },
            "dataset": {"args": {"classes": list(DETOXIFY_CLASSES)}},
        },
        "state_dict": model.state_dict(),
    }
    ckpt_path = root / "tiny-detoxify.ckpt"
    torch.save(checkpoint, ckpt_path)
    return ckpt_path, config_dir


def build_tiny_hf(tmp_dir: str | Path, *, safetensors: bool = True) -> Path:
    """Save a tiny binary text classifier (non-toxic / toxic) as a local HF model dir."""
    model_dir = Path(tmp_dir)
    model, _ = tiny_bert(
        model_dir,
        num_labels=2,
        id2label={0: "non-toxic", 1: "toxic"},
        label2id={"non-toxic": 0, "toxic": 1},
    )
    if safetensors:
        model.save_pretrained(model_dir)
    else:
        import torch

        model.config.save_pretrained(model_dir)
        torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    return model_dir
