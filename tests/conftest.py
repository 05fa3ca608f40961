"""Shared fixtures: a tiny real model, tokenizer, masked dataset and a real Trainer factory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: tiny ops run faster, and timings steadier, without OpenMP."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def torchrun():
    """Runs a script under ``torch.distributed.run`` with 2 local processes (gloo on CPU)."""

    def run(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run
