"""Shared fixtures: a tiny real model, tokenizer, masked dataset and a real Trainer factory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def tiny():
    """A fresh tiny setup (LoRA on a copy-pretrained ~94k-parameter Llama, reversal data)."""
    from lossguard.testing.tiny import tiny_setup

    return tiny_setup()


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests leave files worth looking at (screenshots); kept after the run."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
