"""The held-out sets benchmarks/recovery.py scores the testbed rows on: correctly labelled examples
of the scenario's task whose prompts neither training nor the safety net's judge sees."""

from __future__ import annotations

import sys
from pathlib import Path

from lossguard.testing.testbed import tasks as T
from lossguard.testing.testbed.scenarios import SCENARIOS

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from recovery import SCENARIOS as RECOVERY_SCENARIOS  # noqa: E402
from recovery import TESTBED, held_out_testbed  # noqa: E402


def _prompt(ex):
    return tuple(t for t, label in zip(ex["input_ids"], ex["labels"]) if label == T.IGNORE)


def test_held_out_classification_set_is_unseen_and_correctly_labelled():
    """The collapsed classifier trains on shuffled labels: its held-out lines keep their true ones."""
    name = "classify-collapse"
    pieces = SCENARIOS[name].build()
    test = held_out_testbed(name, pieces)
    assert len(test) == 256
    seen = {_prompt(ex) for ex in pieces.train + pieces.eval}
    assert not seen & {_prompt(ex) for ex in test}
    assert len({_prompt(ex) for ex in test}) == 256
    tok = pieces.tokenizer
    answers = {tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != T.IGNORE]) for ex in test}
    assert answers == {f" {c}" for c in T.CLASSES}  # one label word per example, every class present
    kinds = [tok.decode(ex["input_ids"][-1:]).strip() for ex in test]
    assert 0.6 < kinds.count("set") / len(kinds) < 0.8  # the task's prior (70% "set"), not a shuffle of it
    def kind_of(line: str) -> str:  # what the statement is, read off its text
        first = line.split()[0]
        return first if first in ("return", "raise", "if") else "set"

    lines = [tok.decode(ex["input_ids"][1:-1]).split("Line: ", 1)[1].rsplit("\nKind:", 1)[0] for ex in test]
    right = sum(kind_of(line) == kind for line, kind in zip(lines, kinds))
    assert right / len(test) > 0.95, right  # true labels (a shuffled 70/15/10/5 would match about 55%)


def test_every_testbed_row_names_a_testbed_scenario():
    assert set(TESTBED) == {"tb-healthy", "tb-collapse", "tb-lr-too-high", "tb-corrupted", "tb-fp16"}
    assert all(RECOVERY_SCENARIOS[n].testbed in SCENARIOS for n in TESTBED)
