"""The testbed's pretrained base: a 1.3M-parameter Llama and its BPE tokenizer, committed here.

``load_base()`` gives a fresh float32 model on each call (fine-tunes mutate it), from half
precision weights in ``assets/`` made by ``scripts/pretrain_base.py``; nothing touches the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = "base.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
RECORD = "pretrain.json"

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


@dataclass
class Base:
    """A loaded base: the model (float32, train mode), its tokenizer and the pretraining record."""

    model: Any
    tokenizer: Any
    record: dict[str, Any]


def model_config(vocab_size: int, **overrides: Any) -> Any:
    """The architecture: 4 layers, width 128, 4 heads, SwiGLU 352, RoPE, untied embeddings."""
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def wrap_tokenizer(tok: Any) -> Any:
    """A ``tokenizers.Tokenizer`` as the ``PreTrainedTokenizerFast`` a Trainer user holds."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


@lru_cache(maxsize=2)
def _read(assets: str) -> tuple[dict[str, Any], dict[str, Any], str, dict[str, Any]]:
    from safetensors.torch import load_file

    root = Path(assets)
    weights = {k: v.float() for k, v in load_file(root / WEIGHTS).items()}
    config = json.loads((root / CONFIG).read_text(encoding="utf-8"))
    record = json.loads((root / RECORD).read_text(encoding="utf-8"))
    return weights, config, (root / TOKENIZER).read_text(encoding="utf-8"), record


def load_base(assets: Path | None = None) -> Base:
    """The pretrained base, ready to fine-tune (the files are read once per process).

    Raises:
        FileNotFoundError: the assets are missing (rebuild them with ``scripts/pretrain_base.py``).
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(assets) if assets is not None else ASSETS
    missing = [n for n in (WEIGHTS, CONFIG, TOKENIZER, RECORD) if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: testbed base missing {', '.join(missing)}; "
                                f"run scripts/pretrain_base.py")
    weights, config, tok_json, record = _read(str(root))
    cfg = LlamaConfig.from_dict(config)
    with torch.random.fork_rng():  # the throwaway initialisation must not move the caller's RNG
        model = LlamaForCausalLM(cfg)
    model.load_state_dict(weights)
    model.train()
    return Base(model=model, tokenizer=wrap_tokenizer(Tokenizer.from_str(tok_json)), record=dict(record))
