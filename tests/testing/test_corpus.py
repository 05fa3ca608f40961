"""The real-log corpus: every file loads through lossguard's own readers, its labels are valid
and consistent with the data, the split keeps repositories apart, and the README's table is
current."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

from lossguard.testing.corpus import (
    ADAPTERS,
    ANOMALIES,
    FLAGS,
    FORMATS,
    TASKS,
    Label,
    Split,
    corpus_dir,
    hashed_split,
    load_corpus,
    read_labels,
)

ROOT = corpus_dir()


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def _moves() -> dict[str, str]:
    """Manual split moves from the README: rows ``| move | repo | from | to | why |``."""
    out = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*move\s*\|\s*`?([^|`]+?)`?\s*\|\s*(dev|test)\s*\|\s*(dev|test)\s*\|", line)
        if m:
            out[m.group(1)] = m.group(3)
    return out


def _readme_counts() -> dict[str, tuple[int, int]]:
    """The label table of the README: rows ``| label | dev | test | total |``."""
    out = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`(\w+)`\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", line)
        if m and m.group(1) in {lab.value for lab in Label}:
            dev, test, total = int(m.group(2)), int(m.group(3)), int(m.group(4))
            assert dev + test == total, line
            out[m.group(1)] = (dev, test)
    return out


def test_every_log_loads_through_the_foreign_readers(corpus):
    rows = read_labels()
    assert len(corpus) == len(rows) > 0
    for c in corpus:
        assert c.log.source == c.format
        assert c.file.name.startswith(c.id + ".")


def test_every_usable_log_has_a_finite_loss_and_its_count_is_recorded(corpus):
    for c in corpus:
        losses = [s.loss for s in c.log.samples if s.loss is not None]
        assert len(losses) == c.n_values, c.id
        if c.label is not Label.UNUSABLE:
            assert any(math.isfinite(v) for v in losses), c.id
            assert c.n_values >= 5, f"{c.id}: fewer than 5 values must be labelled unusable"


def test_metadata_fields_are_valid(corpus):
    assert len({c.id for c in corpus}) == len(corpus)
    for c in corpus:
        assert re.fullmatch(r"(hf|lf|pl)-\d{4}", c.id), c.id
        assert c.format in FORMATS and c.task in TASKS and c.adapter in ADAPTERS, c.id
        assert re.fullmatch(r"[0-9a-f]{40}", c.commit), c.id
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", c.repo), c.id
        assert c.path and not c.path.startswith("/"), c.id
        assert set(c.flags) <= set(FLAGS), (c.id, set(c.flags) - set(FLAGS))
        assert c.notes and len(c.notes) > 20, c.id
        assert c.log_every is None or c.log_every > 0, c.id


def test_anomalies_carry_an_onset_inside_the_log_that_matches_what_it_names(corpus):
    for c in corpus:
        steps = [s.step for s in c.log.samples if s.loss is not None]
        if c.label not in ANOMALIES:
            assert c.onset_step is None, c.id
            continue
        assert c.onset_step is not None and steps[0] <= c.onset_step <= steps[-1], c.id
        at = {s.step: s.loss for s in c.log.samples}
        if c.label is Label.ZERO_LOSS:
            assert at[c.onset_step] == 0.0, c.id
            assert all(v != 0.0 for st, v in at.items() if st < c.onset_step), c.id
        if c.label is Label.NONFINITE:
            assert not math.isfinite(at[c.onset_step]), c.id
            assert all(math.isfinite(v) for st, v in at.items() if st < c.onset_step and v is not None), c.id


def test_splits_never_share_a_repository_and_follow_the_hash_rule(corpus):
    moves = _moves()
    by_repo: dict[str, set[Split]] = {}
    for c in corpus:
        by_repo.setdefault(c.repo, set()).add(c.split)
        want = Split(moves[c.repo]) if c.repo in moves else hashed_split(c.repo)
        assert c.split is want, (c.id, c.repo)
    assert all(len(s) == 1 for s in by_repo.values())


def test_label_counts_match_the_readme_table(corpus):
    counts = Counter((c.label.value, c.split.value) for c in corpus)
    table = _readme_counts()
    assert set(table) == {lab.value for lab in Label}
    for label, (dev, test) in table.items():
        assert (counts[(label, "dev")], counts[(label, "test")]) == (dev, test), label


def test_filters_by_split_and_label(corpus):
    test = load_corpus(split="test")
    assert test and all(c.split is Split.TEST for c in test)
    healthy = load_corpus(labels=[Label.HEALTHY, "staircase"])
    assert healthy and all(c.label.is_healthy for c in healthy)
    assert len(load_corpus(split=Split.DEV)) + len(test) == len(corpus)
    with pytest.raises(ValueError):
        load_corpus(labels="no_such_label")


def test_the_corpus_stays_small():
    total = sum(p.stat().st_size for p in (ROOT / "logs").iterdir())
    assert total < 25 * 2**20
    assert all(p.stat().st_size < 2**20 for p in (ROOT / "logs").iterdir())


def test_every_file_in_logs_is_labelled():
    labelled = {Path(r["file"]).name for r in read_labels()}
    assert {p.name for p in (ROOT / "logs").iterdir()} == labelled
