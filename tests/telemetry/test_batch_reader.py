"""The batched reader gives exactly what the line-by-line reader gives, on clean and damaged logs."""

import json
import math
import random

import numpy as np
import pytest

from lossguard.errors import LogReadError
from lossguard.numbers import as_float
from lossguard.telemetry import iter_events, open_run, read_events
from lossguard.telemetry.reader import iter_event_batches
from lossguard.telemetry.runlog import SampleColumns


def _reference_columns(recs):
    """Columns as the one-list reader built them before batching (the definition of the semantics)."""
    steps, keep = [], []
    for r in recs:
        st = r.get("step")
        if st is None or isinstance(st, bool):  # true is no step
            continue
        try:
            f = float(st)  # ints, floats and numeric strings; the fraction is dropped
        except (TypeError, ValueError, OverflowError):
            continue
        if not 0 <= f <= 2**53:  # negative, huge, inf, NaN: damage
            continue
        steps.append(int(f))
        keep.append(r)
    cols = {}
    for name in ("loss", "grad_norm", "lr", "epoch"):
        conv = [as_float(r.get(name)) for r in keep]
        cols[name] = (np.array([math.nan if v is None else v for v in conv], dtype=float),
                      np.array([v is not None for v in conv], dtype=bool))
    st = np.array(steps, dtype=np.int64)
    order = np.argsort(st, kind="stable")
    s = st[order]
    last = order[np.concatenate([s[1:] != s[:-1], [True]])] if len(s) else order
    return st[last], {k: (v[last], h[last]) for k, (v, h) in cols.items()}


def _sample_line(rng: random.Random, step: int) -> str:
    rec = {"v": 1, "t": 1.7e9 + step, "kind": "sample", "step": step, "loss": rng.uniform(0.5, 3.0),
           "grad_norm": rng.uniform(0.1, 2.0), "lr": 1e-4, "epoch": step / 1000}
    roll = rng.random()
    if roll < 0.05:
        rec["loss"] = rng.choice(["nan", "inf", "-inf", None])
    elif roll < 0.08:
        del rec["grad_norm"]
    elif roll < 0.10:
        rec["step"] = rng.choice([float(step), str(step), None, "x", 3.5, True])
    elif roll < 0.12:
        rec["lr"] = rng.choice(["1e-4", "fast", [1.0], {"a": 1}])
    elif roll < 0.14:
        rec["future_field"] = {"nested": [1, 2, {"x": "}\n{"}]}
    return json.dumps(rec, separators=(",", ":"))


def _damaged_log(rng: random.Random, n: int) -> bytes:
    lines: list[str] = [json.dumps({"v": 1, "t": 0, "kind": "run", "max_steps": 2 * n})]
    for step in range(1, n + 1):
        lines.append(_sample_line(rng, step if rng.random() > 0.05 else max(1, step - rng.randint(1, 5))))
        roll = rng.random()
        if roll < 0.02:
            lines.append("")  # blank line
        elif roll < 0.04:
            lines.append(f'{{"v":1,"kind":"sample","step":{step},"lo')  # a line cut short, then resumed
        elif roll < 0.05:
            lines.append("garbage \x00\xff")
        elif roll < 0.06:
            lines.append(f'{{"v":2,"kind":"hologram","step":{step}}}')
        elif roll < 0.07:
            lines.append(f'{{"v":1,"kind":"finding","reason":"spike","severity":"warning","step":{step},'
                         f'"onset_step":{step},"message":"loss {{x}}"}}')
        elif roll < 0.075:
            lines.append(f'{{"v":1,"kind":"sample","step":{step},"loss":NaN}}')  # a non-strict literal
        elif roll < 0.08:
            lines.append("[1, 2]")
        elif roll < 0.085:
            lines.append('{"a":1},{"b":2}')  # two objects on one line: not a record
    text = "\n".join(lines)
    if rng.random() < 0.5:
        text += "\n"
    else:
        text += '\n{"v":1,"kind":"sample","st'  # truncated last line
    data = text.encode("utf-8", "surrogateescape")
    return data.replace(b"\n", b"\r\n") if rng.random() < 0.2 else data


@pytest.mark.parametrize("seed", range(12))
def test_batches_match_the_line_reader_on_damaged_logs(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "events.jsonl"
    path.write_bytes(_damaged_log(rng, rng.choice([30, 400])))
    expected = list(iter_events(path))
    assert read_events(path) == expected
    for batch_bytes in (1, 97, 1000):
        got = [r for batch in iter_event_batches(path, batch_bytes=batch_bytes) for r in batch]
        assert got == expected


@pytest.mark.parametrize("seed", range(12))
def test_columnar_read_matches_the_one_list_columns(tmp_path, seed):
    rng = random.Random(100 + seed)
    run = tmp_path / "run"
    path = run / "lossguard" / "events.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(_damaged_log(rng, 600))
    log = open_run(run, columns=True)
    recs = list(iter_events(path))
    steps, cols = _reference_columns([r for r in recs if r.get("kind") == "sample"])
    got = log.columns
    np.testing.assert_array_equal(got.steps, steps)
    for name, (vals, _) in cols.items():
        np.testing.assert_array_equal(getattr(got, name), vals)  # NaN == NaN here
    np.testing.assert_array_equal(got.has_loss, cols["loss"][1])
    np.testing.assert_array_equal(got.has_grad_norm, cols["grad_norm"][1])
    rows = open_run(run)
    assert log.max_steps == rows.max_steps == 1200
    assert [(f.step, f.message) for f in log.findings] == [(f.step, f.message) for f in rows.findings]
    assert [s.step for s in rows.samples] == steps.tolist()


def test_clean_log_with_crlf_and_a_logged_nan_literal(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"kind":"sample","step":1,"loss":2.0}\r\n{"kind":"sample","step":2,"loss":NaN}\r\n'
                     b'{"kind":"sample","step":2,"loss":1.5,"grad_norm":"inf"}\r\n')
    assert read_events(path) == list(iter_events(path))
    cols = SampleColumns.from_record_batches(iter_event_batches(path, batch_bytes=40))
    assert cols.steps.tolist() == [1, 2] and cols.loss.tolist() == [2.0, 1.5]
    assert cols.grad_norm[1] == math.inf and cols.has_grad_norm.tolist() == [False, True]


def test_logged_nan_and_missing_values_are_told_apart(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"kind":"sample","step":1,"loss":"nan"}\n{"kind":"sample","step":2,"loss":null}\n'
                    '{"kind":"sample","step":3}\n{"kind":"sample","step":4,"loss":NaN,"grad_norm":null}\n')
    cols = SampleColumns.from_record_batches(iter_event_batches(path))
    assert np.isnan(cols.loss).all()
    assert cols.has_loss.tolist() == [True, False, False, True]
    assert cols.has_grad_norm.tolist() == [False] * 4


def test_a_file_of_garbage_still_says_so_with_the_count(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\x00\xff\xfe garbage\n\nmore garbage\n{\"kind\":\n")
    with pytest.raises(LogReadError, match=r"events.jsonl: not a JSON-lines log \(3 unreadable line"):
        read_events(path)
    with pytest.raises(LogReadError, match=r"\(3 unreadable line"):
        list(iter_events(path))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    assert read_events(empty) == []
