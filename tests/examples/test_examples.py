"""The examples: adapter_swap runs end to end offline; qwen_qlora's masking runs on the tiny tokenizer."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lossguard.preflight import Status, preflight
from lossguard.testing.tiny import build_tokenizer, tiny_setup, training_args

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qlora():
    return load_example("qwen_qlora")


@pytest.mark.slow
def test_adapter_swap_runs_offline_and_each_adapter_wins(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "adapter_swap.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "each adapter is best on its own task" in out
    losses = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"adapter '(\w+)'\s+reverse ([\d.]+), copy ([\d.]+)", out)}
    assert losses["reverse"][0] < 1.0 < losses["copy"][0]  # the reverse adapter learned reversal
    assert losses["copy"][1] < losses["reverse"][1]
    assert "answer to 'rev : d o g =>': g o d </s>" in out
    assert "swap needs adapter_config.json + adapter_model.safetensors" in out
    assert (tmp_path / "reverse-lora" / "checkpoint-300" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "copy-lora" / "checkpoint-150" / "optimizer.pt").is_file()


def test_mask_prompt_labels_and_truncation(qlora):
    row = qlora.mask_prompt([1, 2, 3], [7, 8, 9], max_length=10)
    assert row == {"input_ids": [1, 2, 3, 7, 8, 9], "attention_mask": [1] * 6, "labels": [-100, -100, -100, 7, 8, 9]}
    cut = qlora.mask_prompt([1, 2, 3], [7, 8, 9], max_length=4)
    assert cut["input_ids"] == [1, 2, 3, 7] and cut["labels"] == [-100, -100, -100, 7]
    assert qlora.mask_prompt([1, 2, 3], [7, 8, 9], max_length=3) is None  # nothing left to learn
    assert qlora.mask_prompt([1, 2], [], max_length=8) is None


def test_plain_format_without_chat_template(qlora):
    tok = build_tokenizer()
    assert not getattr(tok, "chat_template", None)
    row = qlora.tokenize_example(tok, "rev : c a b", "b a c")
    prompt = [tok.bos_token_id, *tok(qlora.fallback_prompt("rev : c a b"), add_special_tokens=False)["input_ids"]]
    answer = tok.convert_tokens_to_ids(["b", "a", "c"]) + [tok.eos_token_id]
    assert row["input_ids"] == prompt + answer
    assert row["labels"] == [-100] * len(prompt) + answer
    assert [i for i, x in enumerate(row["labels"]) if x == -100] == list(range(len(prompt)))


def test_chat_template_masks_everything_up_to_the_assistant_turn(qlora):
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : {% endif %}"
    )
    prompt_text, response_text = qlora.format_example(tok, "rev : c a b =>", "b a c")
    assert prompt_text.endswith("assistant : ") and response_text.strip() == "b a c </s>"
    row = qlora.tokenize_example(tok, "rev : c a b =>", "b a c")
    answer = tok.convert_tokens_to_ids(["b", "a", "c", "</s>"])
    n_prompt = len(row["input_ids"]) - len(answer)
    assert row["input_ids"][n_prompt:] == answer
    assert row["labels"] == [-100] * n_prompt + answer
    assert row["input_ids"][:n_prompt] == tok(prompt_text, add_special_tokens=False)["input_ids"]


def test_build_dataset_drops_rows_with_nothing_to_learn_and_preflight_agrees(qlora, tmp_path):
    tok = build_tokenizer()
    pairs = [("rev : a b", "b a"), ("rev : " + " ".join("abcdefghij"), "j i h g f e d c b a"), ("rev : c", "c")]
    rows, dropped = qlora.build_dataset(tok, pairs, max_length=14)
    assert dropped == 1 and len(rows) == 2
    assert all(any(x != -100 for x in r["labels"]) for r in rows)
    report = preflight(training_args(str(tmp_path)), tiny_setup(pretrain_steps=20).model, rows)
    assert report.row("rows with nothing to learn").status is Status.OK
    assert report.row("prompt masking").status is Status.OK
    assert report.facts["rows_unmasked"] == 0
