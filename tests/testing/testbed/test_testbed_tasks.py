"""Tasks cut from the standard library: masked as users mask, deterministic, with the stated prior."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from lossguard.testing.testbed import tasks as T
from lossguard.testing.testbed.base import load_base


@pytest.fixture(scope="module")
def tok():
    return load_base().tokenizer


def test_prompt_is_masked_and_answer_learned(tok):
    pair = T.instruction_pairs(3, seed=0)[0]
    ex = T.encode(tok, pair)
    answer = tok(pair.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(ex["input_ids"]) - len(answer)
    assert ex["labels"][:n_prompt] == [T.IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == answer == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][0] == tok.bos_token_id
    inverted = T.encode(tok, pair, mask="answer")
    assert inverted["labels"][n_prompt:] == [T.IGNORE] * len(answer)
    assert inverted["labels"][:n_prompt] == ex["input_ids"][:n_prompt]
    with pytest.raises(ValueError, match="mask="):
        T.encode(tok, pair, mask="both")


def test_instruction_pairs_are_real_and_deterministic():
    pairs = T.instruction_pairs(90, seed=3)
    assert pairs == T.instruction_pairs(90, seed=3)
    assert Counter(p.task for p in pairs) == {"name": 30, "summary": 30, "topic": 30}
    names = {f.name for f in T.functions()}
    assert all(p.answer.strip() in names for p in pairs if p.task == "name")
    assert any("statement" in p.prompt for p in pairs if p.task == "topic")


def test_classification_has_the_stated_prior_and_a_long_prompt_keeps_its_answer(tok):
    pairs = T.classification_pairs(400, seed=0)
    counts = Counter(p.answer.strip() for p in pairs)
    assert [counts[c] for c in T.CLASSES] == [280, 60, 40, 20]
    assert math.isclose(T.prior_entropy(), 0.9143, abs_tol=1e-4)
    for c in T.CLASSES:  # one label token each: the collapsed loss is exactly the prior's entropy
        assert len(tok(f" {c}", add_special_tokens=False)["input_ids"]) == 1
    shuffled = T.misaligned(pairs, seed=0)
    assert Counter(p.answer for p in shuffled) == Counter(p.answer for p in pairs)
    assert [p.prompt for p in shuffled] == [p.prompt for p in pairs]
    long = T.Pair("classify", "Line: " + "x = 1; " * 200 + "\nKind:", " assign")
    ex = T.encode(tok, long, max_len=64, eos=False)
    assert len(ex["input_ids"]) == 64 and ex["labels"][-1] == ex["input_ids"][-1] != T.IGNORE


def test_foreign_tokens_keep_the_prompt_and_preference_pairs_differ(tok):
    ex = T.encode(tok, T.instruction_pairs(1, seed=0)[0])
    n_prompt = ex["labels"].count(T.IGNORE)
    bad = T.foreign_tokens(ex, len(tok), seed=0, length=50)
    assert bad["input_ids"][:n_prompt] == ex["input_ids"][:n_prompt]
    assert bad["labels"][:n_prompt] == [T.IGNORE] * n_prompt
    assert bad["labels"][n_prompt:] == bad["input_ids"][n_prompt:] and len(bad["input_ids"]) == n_prompt + 50
    assert all(3 <= t < len(tok) for t in bad["input_ids"][n_prompt:])
    prefs = T.preference_pairs(10, seed=0)
    assert len(prefs) == 10 and all(chosen != rejected for _, chosen, rejected in prefs)
    assert all(sorted(chosen.split()) == sorted(rejected.split()) for _, chosen, rejected in prefs)  # word salad
    names = T.preference_pairs(10, seed=0, rejected="other-name")
    assert all(chosen != rejected and len(chosen.split()) == 1 for _, chosen, rejected in names)
    same = T.preference_pairs(10, seed=0, rejected="same")
    assert [p[:2] for p in same] == [p[:2] for p in prefs] and all(c == r for _, c, r in same)
    with pytest.raises(ValueError, match="rejected="):
        T.preference_pairs(1, rejected="nonsense")
