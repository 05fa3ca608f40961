"""Preflight on the tiny real model: the user's TrainingArguments, masking audits, cadence checks."""

from __future__ import annotations

import json

import pytest
import torch

from lossguard.preflight import PreflightReport, Status, preflight
from lossguard.telemetry.schema import encode
from lossguard.testing.tiny import build_dataset, build_model, make_example, tiny_setup, training_args


@pytest.fixture(scope="module")
def setup():
    return tiny_setup(pretrain_steps=20)


def notes_args(tmp_path, **overrides):
    """The TrainingArguments from the user's notes."""
    from transformers import TrainingArguments

    kw = dict(
        output_dir=str(tmp_path / "qwen-qlora-it"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        num_train_epochs=3,
        learning_rate=2e-4,
        fp16=True,
        logging_steps=20,
        save_steps=200,
        report_to="none",
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def status(report: PreflightReport, name: str) -> Status:
    row = report.row(name)
    assert row is not None, f"no row {name!r} in {[r.name for r in report.rows]}"
    return row.status


def test_users_notes_arguments_on_tiny_model(setup, tmp_path):
    args = notes_args(tmp_path)
    report = preflight(args, setup.model, setup.train, data_collator=setup.collator)
    f = report.facts
    assert f["effective_batch"] == 16
    assert f["steps_per_epoch"] == 32  # 512 rows / 2 per device = 256 micro-batches / 8 accumulation
    assert f["total_steps"] == 96
    assert "16 sequences per optimizer step (2 per device x 8 accumulation x 1 process)" in \
        report.row("effective batch").value
    assert "every 20 steps" in report.row("loss printed").value
    assert "4 times over 96 steps" in report.row("loss printed").value
    assert status(report, "loss printed") is Status.INFO  # sparse, but lossguard records every step
    # save_steps=200: later than the last step
    ck = report.row("checkpoints")
    assert ck.status is Status.WARN
    assert ck.advice == "the first checkpoint (step 200) comes after the last step (96): set save_steps <= 96"
    trainable, total = setup.model.get_nb_trainable_parameters()
    assert (f["params_total"], f["params_trainable"]) == (total, trainable)
    assert "r=8" in report.row("adapter").value and "alpha=16 (scale 2)" in report.row("adapter").value
    # masking audit against an independent count (a causal LM never predicts position 0)
    supervised = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in setup.train)
    masked = sum(sum(1 for x in r["labels"] if x == -100) for r in setup.train)
    positions = sum(len(r["labels"]) for r in setup.train)
    assert f["supervised_tokens_estimate"] == supervised
    assert f["tokens_estimate"] == positions
    assert f["masked_share"] == pytest.approx(masked / positions)
    assert f["rows_nothing_to_learn"] == 0 and f["rows_unmasked"] == 0
    assert status(report, "rows with nothing to learn") is Status.OK
    assert status(report, "prompt masking") is Status.OK
    assert status(report, "tokens vs parameters") is Status.OK
    assert status(report, "pre-training reference") is Status.INFO
    assert f"{20 * total / 1e6:.3g}M tokens" in report.row("pre-training reference").value
    assert status(report, "mixed precision") is Status.INFO  # fp16 asked, but this machine has no GPU
    assert all(r.advice for r in report.rows if r.status is Status.WARN)  # every warning says what to change


def test_record_is_strict_json_with_rows(setup, tmp_path):
    report = preflight(notes_args(tmp_path), setup.model, setup.train)
    rec = json.loads(encode(report.to_record()))
    assert rec["kind"] == "preflight"
    assert [r["name"] for r in rec["rows"]] == [r.name for r in report.rows]
    assert {r["status"] for r in rec["rows"]} <= {"ok", "info", "warn"}
    assert rec["warnings"] == report.warnings
    assert any(w.startswith("checkpoints:") for w in report.warnings)


def test_fully_masked_example_is_flagged(setup, tmp_path):
    rows = list(setup.train[:40])
    dead = make_example(setup.tokenizer, ["a", "b", "c"])
    dead["labels"] = [-100] * len(dead["labels"])
    rows.append(dead)
    report = preflight(training_args(str(tmp_path)), setup.model, rows)
    assert report.facts["rows_nothing_to_learn"] == 1
    row = report.row("rows with nothing to learn")
    assert row.status is Status.WARN
    assert row.value == "1 of 41 rows (2.4%) have no supervised token"
    assert "NaN" in row.advice and "drop rows" in row.advice


def test_unmasked_instruction_data_warns_and_plain_text_only_informs(setup, tmp_path):
    args = training_args(str(tmp_path))
    unmasked = []
    for r in setup.train[:30]:
        unmasked.append({**r, "labels": list(r["input_ids"]), "prompt": "rev", "response": "x"})
    report = preflight(args, setup.model, unmasked)
    assert report.facts["rows_unmasked"] == 30
    assert report.facts["masked_share"] == 0.0
    row = report.row("prompt masking")
    assert row.status is Status.WARN
    assert "30 of 30 rows have labels == input_ids everywhere" in row.value
    assert "-100" in row.advice

    plain = [{k: v for k, v in r.items() if k not in ("prompt", "response")} for r in unmasked]
    assert preflight(args, setup.model, plain).row("prompt masking").status is Status.INFO


def test_collator_that_rebuilds_labels_unmasks_prompts(setup, tmp_path):
    from transformers import DataCollatorForLanguageModeling

    rows = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in setup.train[:24]]
    collator = DataCollatorForLanguageModeling(setup.tokenizer, mlm=False)
    report = preflight(training_args(str(tmp_path)), setup.model, rows, data_collator=collator)
    assert report.facts["rows_unmasked"] == 24
    assert "after the data collator" in report.row("label masking").value
    # padding positions (attention_mask 0) are not counted as tokens
    assert report.facts["tokens_estimate"] == sum(len(r["input_ids"]) for r in rows)


def test_too_small_dataset_for_model_size(tmp_path, setup):
    big = build_model(setup.tokenizer, hidden_size=512, layers=2)  # ~5M parameters
    total = sum(p.numel() for p in big.parameters())
    rows = build_dataset(setup.tokenizer, 3)
    supervised = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    assert supervised < 1e-5 * total
    report = preflight(training_args(str(tmp_path)), big, rows)
    row = report.row("tokens vs parameters")
    assert row.status is Status.WARN
    assert f"{supervised} supervised tokens vs 1e-5 x" in row.value
    assert "little effect" in row.advice
    assert report.row("adapter").status is Status.INFO  # full fine-tuning noted
    assert report.row("effective batch").status is Status.WARN  # 3 rows < one batch of 8


@pytest.mark.parametrize(
    ("save_steps", "limit", "expect", "needle"),
    [
        (100, None, Status.OK, ""),
        (50, 3, Status.OK, ""),
        (50, 1, Status.WARN, "set save_total_limit=3 or more"),
        # further apart than the rollback distance: a note, since rollbacks use in-memory snapshots
        (150, None, Status.INFO, "checkpoints are further apart than the 100-step rollback distance"),
        (0.25, 2, Status.INFO, "further apart than the 100-step"),  # a ratio: 0.25 x 600 steps
    ],
)
def test_save_cadence_against_rollback(tmp_path, setup, save_steps, limit, expect, needle):
    args = training_args(str(tmp_path), max_steps=600, save_strategy="steps", save_steps=save_steps,
                         save_total_limit=limit)
    row = preflight(args, setup.model, setup.train, rollback_steps=100).row("checkpoints")
    assert row.status is expect, row.advice
    assert needle in row.advice


def test_no_checkpoints_warns(tmp_path, setup):
    row = preflight(training_args(str(tmp_path)), setup.model, None).row("checkpoints")
    assert row.status is Status.WARN and "save_strategy='steps'" in row.advice


def test_dense_logging_is_ok(tmp_path, setup):
    args = training_args(str(tmp_path), max_steps=1000, logging_steps=10)
    report = preflight(args, setup.model, setup.train)
    assert report.row("loss printed").status is Status.OK
    assert "100 times over 1000 steps" in report.row("loss printed").value


def test_dataset_kinds_agree_and_sampling_is_reported(tmp_path, setup):
    import datasets
    from torch.utils.data import DataLoader, Dataset

    class TorchRows(Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {k: torch.tensor(v) for k, v in self.rows[i].items()}

    args = training_args(str(tmp_path))
    rows = setup.train[:64]
    reference = preflight(args, setup.model, rows).facts
    for ds in (TorchRows(rows), datasets.Dataset.from_list(rows), DataLoader(rows, batch_size=8,
                                                                            collate_fn=setup.collator)):
        facts = preflight(args, setup.model, ds).facts
        for key in ("tokens_estimate", "supervised_tokens_estimate", "masked_share", "rows_total"):
            assert facts[key] == reference[key], (type(ds).__name__, key)

    sampled = preflight(args, setup.model, setup.train, sample_limit=100)
    assert sampled.facts["sampled"] is True and sampled.facts["rows_sampled"] == 100
    assert "estimated from 100 sampled of 512 rows" in sampled.row("dataset tokens").value
    full = preflight(args, setup.model, setup.train).facts["tokens_estimate"]
    assert abs(sampled.facts["tokens_estimate"] - full) / full < 0.1


def test_odd_inputs_never_raise(setup):
    class Weird:
        per_device_train_batch_size = "lots"
        logging_steps = float("nan")
        save_strategy = object()

    for args, model, data in [
        (None, None, None),
        (Weird(), object(), ["just text", 3, None]),
        (Weird(), setup.model, [{"input_ids": [[1, 2], [3]], "labels": "x"}, {"text": "hello"}]),
        (object(), setup.model, iter([{"input_ids": [1, 2]}])),
    ]:
        report = preflight(args, model, data)
        assert isinstance(report.rows, list)
        assert report.row("effective batch") is not None
    report = preflight(None, setup.model, [{"text": "hello"}])
    assert report.row("dataset tokens").status is Status.INFO  # raw text: counted later, not guessed
    assert report.row("label masking") is None


def test_empty_dataset_warns(tmp_path, setup):
    assert preflight(training_args(str(tmp_path)), setup.model, []).row("dataset tokens").status is Status.WARN


def test_device_map_over_two_gpus_without_launcher(setup, tmp_path, monkeypatch):
    model = setup.model
    monkeypatch.setattr(model.base_model.model, "hf_device_map",
                        {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1},
                        raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    report = preflight(training_args(str(tmp_path)), model, setup.train)
    row = report.row("device placement")
    assert row.status is Status.WARN
    assert "device_map spans 2 GPUs" in row.value
    assert "torchrun --nproc_per_node=2" in row.advice and "accelerate launch" in row.advice
    assert report.facts["device_map_gpus"] == ["cuda:0", "cuda:1"]

    # under a launcher (two processes) each rank places its own copy: no advice
    launched = preflight(training_args(str(tmp_path)), model, setup.train, world_size=2)
    assert launched.row("device placement").status is Status.OK


@pytest.mark.parametrize(
    ("fp16", "bf16", "gpu_bf16", "expect", "needle"),
    [
        (True, False, True, Status.WARN, "set bf16=True, fp16=False"),
        (True, False, False, Status.OK, ""),
        (False, True, True, Status.OK, ""),
        (False, True, False, Status.WARN, "set fp16=True, bf16=False"),
        (False, False, True, Status.WARN, "set bf16=True"),
    ],
)
def test_precision_choice_on_a_gpu(setup, tmp_path, monkeypatch, fp16, bf16, gpu_bf16, expect, needle):
    import lossguard.preflight as pf

    monkeypatch.setattr(pf, "gpu_info", lambda: (True, gpu_bf16, "FakeGPU"))  # the hardware is the fake
    args = training_args(str(tmp_path), use_cpu=False, fp16=False, bf16=False)
    args.fp16, args.bf16 = fp16, bf16
    row = preflight(args, setup.model, None).row("mixed precision")
    assert row.status is expect and needle in row.advice


def test_fp16_amp_over_fp16_trainable_weights(setup, tmp_path, monkeypatch):
    import lossguard.preflight as pf

    monkeypatch.setattr(pf, "gpu_info", lambda: (True, False, "T4"))
    model = build_model(setup.tokenizer).half()
    args = training_args(str(tmp_path), use_cpu=False)
    args.fp16 = True
    row = preflight(args, model, None).row("mixed precision")
    assert row.status is Status.WARN and "unscale FP16 gradients" in row.advice


def test_world_size_and_accumulation_in_effective_batch(setup, tmp_path):
    args = training_args(str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         num_train_epochs=1, max_steps=-1)
    report = preflight(args, setup.model, setup.train, world_size=4)
    assert report.facts["effective_batch"] == 32
    assert report.facts["steps_per_epoch"] == 16  # 512 / 4 ranks = 128 rows -> 32 batches -> 16 steps


def test_trainer_dataloader_as_the_callback_sees_it(setup, tmp_path):
    import datasets
    from transformers import Trainer

    rows = [{**r, "prompt": "rev"} for r in setup.train[:64]]  # a text column the Trainer drops
    trainer = Trainer(model=setup.model, args=training_args(str(tmp_path)),
                      train_dataset=datasets.Dataset.from_list(rows), data_collator=setup.collator)
    via_loader = preflight(trainer.args, setup.model, trainer.get_train_dataloader())
    via_dataset = preflight(trainer.args, setup.model, trainer.train_dataset, data_collator=trainer.data_collator)
    for report in (via_loader, via_dataset):
        assert "after the data collator" in report.row("label masking").value
        assert report.facts["rows_total"] == 64 and report.facts["steps_per_epoch"] == 8
    assert via_loader.facts["tokens_estimate"] == via_dataset.facts["tokens_estimate"] == \
        sum(len(r["input_ids"]) for r in rows)


def _reference_counts(rows: list[dict], shift: bool, pad_id: int | None) -> dict[str, int]:
    """The audit's counts written the plain way, one row and one position at a time."""
    out = dict.fromkeys(("rows_seen", "tokens", "rows_with_labels", "label_positions", "masked_positions",
                         "supervised", "rows_nothing_to_learn", "rows_unmasked"), 0)
    for row in rows:
        ids, mask, labels = row["input_ids"], row.get("attention_mask"), row.get("labels")
        if mask is not None and len(mask) == len(ids):
            real = [m != 0 for m in mask]
        elif labels is not None and pad_id is not None and len(labels) == len(ids):
            real = [not (t == pad_id and lab == -100) for t, lab in zip(ids, labels, strict=True)]
        else:
            real = [True] * len(ids)
        out["rows_seen"] += 1
        out["tokens"] += sum(real)
        if labels is None:
            continue
        out["rows_with_labels"] += 1
        if len(labels) == len(ids):
            kept = [lab for lab, keep in zip(labels, real, strict=True) if keep]
            kept_ids = [t for t, keep in zip(ids, real, strict=True) if keep]
        else:
            kept, kept_ids = labels, []
        out["label_positions"] += len(kept)
        out["masked_positions"] += sum(lab == -100 for lab in kept)
        learned = sum(lab != -100 for lab in (kept[1:] if shift else kept))
        out["supervised"] += learned
        out["rows_nothing_to_learn"] += learned == 0
        out["rows_unmasked"] += bool(kept_ids) and kept == kept_ids
    return out


@pytest.mark.parametrize("seed", range(6))
def test_audit_counts_what_a_plain_count_counts(seed):
    """The audit of a collated batch, and of its rows one by one, count what a plain position-by-position
    count does, over padding, fully masked rows, unmasked rows, rows without real tokens, encoder-decoder
    labels of another length, and with and without an attention mask."""
    from lossguard.preflight.tokens import TokenAudit, audit_batch, audit_row, batch_rows

    rng = torch.Generator().manual_seed(seed)
    rows, length, pad = 12, 9, 0
    ids = torch.randint(1, 50, (rows, length), generator=rng)
    lengths = torch.randint(0, length + 1, (rows,), generator=rng)
    real = torch.arange(length)[None, :] < lengths[:, None]
    ids[~real] = pad
    labels = ids.clone()
    prompt = torch.randint(0, length + 1, (rows,), generator=rng)
    labels[torch.arange(length)[None, :] < prompt[:, None]] = -100
    labels[~real] = -100
    labels[0] = -100  # nothing to learn
    labels[1] = ids[1]  # prompt not masked
    batches = [
        {"input_ids": ids, "attention_mask": real.long(), "labels": labels},
        {"input_ids": ids, "labels": labels},
        {"input_ids": ids},
        {"input_ids": ids, "attention_mask": real.long(), "labels": labels[:, :5]},
        {"input_ids": ids.tolist(), "labels": labels.tolist()},
    ]
    for batch in batches:
        plain_rows = batch_rows(batch)  # lists of ints
        for shift in (True, False):
            for pad_id in (pad, None):
                expected = _reference_counts(plain_rows, shift, pad_id)
                whole, by_row = TokenAudit(rows_total=rows), TokenAudit(rows_total=rows)
                assert audit_batch(batch, whole, shift, pad_id)
                for row in batch_rows(batch):
                    audit_row(row, by_row, shift, pad_id)
                assert whole == by_row
                assert {k: getattr(whole, k) for k in expected} == expected
                assert whole.rows_seen == rows
    first = TokenAudit(rows_total=rows)
    audit_batch(batches[0], first, True, pad)
    assert first.rows_nothing_to_learn >= 1 and first.rows_unmasked >= 1 and 0 < first.supervised < first.tokens


def test_ragged_batch_falls_back_to_rows():
    from lossguard.preflight.tokens import TokenAudit, audit_batch

    audit = TokenAudit(rows_total=2)
    assert not audit_batch({"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [4, 5]]}, audit, True, 0)
    assert audit == TokenAudit(rows_total=2)


def test_frequent_logging_is_not_called_sparse(tmp_path, setup):
    args = notes_args(tmp_path, logging_steps=5)  # 96 steps: printed 19 times
    row = preflight(args, setup.model, setup.train).row("loss printed")
    assert row.status is Status.OK and row.advice == ""


def test_the_demos_own_arguments_raise_no_warning_about_logging_or_checkpoints(tmp_path, setup):
    args = training_args(str(tmp_path), max_steps=600, logging_steps=50, save_strategy="steps", save_steps=200,
                         save_total_limit=2)
    report = preflight(args, setup.model, setup.train, rollback_steps=100)
    assert report.row("loss printed").status is Status.OK  # 12 times: enough for a person to read
    assert report.row("checkpoints").status is Status.INFO
    assert not any(w.startswith(("checkpoints", "loss printed")) for w in report.warnings)


def test_with_recovery_off_nothing_talks_about_rollbacks(tmp_path, setup, capsys):
    from lossguard.config import GuardConfig
    from lossguard.integrations.core import Reporter
    from lossguard.integrations.hf_extras import run_preflight
    from lossguard.telemetry import read_events

    args = training_args(str(tmp_path), max_steps=150, logging_steps=50, save_strategy="steps", save_steps=150,
                         save_total_limit=1)
    config = GuardConfig(recovery=False)
    report = Reporter(config)
    report.open(tmp_path / "lossguard", resumed=False)
    run_preflight(report, config, args, setup.model, None, None)
    report.close(0)
    (rec,) = [r for r in read_events(tmp_path / "lossguard" / "events.jsonl") if r["kind"] == "preflight"]
    text = json.dumps(rec["rows"])
    assert "rollback" not in text and rec["facts"]["rollback_steps"] == 0
    # with recovery on, the same arguments do mention it (the check is live, not silenced)
    assert "rollback" in json.dumps(preflight(args, setup.model, setup.train, rollback_steps=100).to_record()["rows"])
    err = capsys.readouterr().err
    table = err[:err.index("lossguard: training ended")]
    # a CI log (no terminal) gets the table at the width of its content, not wrapped at 80 columns
    assert max(len(line) for line in table.splitlines()) > 100
    assert len(table.splitlines()) < 40
    assert err.splitlines()[-1] == (f"lossguard: training ended at step 0 (0 findings, 0 actions); log "
                                    f"{tmp_path / 'lossguard' / 'events.jsonl'}; look with: lossguard watch "
                                    f"{tmp_path} --once  or  lossguard report {tmp_path}")
