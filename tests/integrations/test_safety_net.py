"""The judge inside a run: its fixed batches (eval slice, kept training rows), its scores, its failures."""

import torch

from lossguard.integrations.safety_net import Judge, TrainingRows, eval_batches
from lossguard.recovery.judge import rows, score_model
from lossguard.testing.tiny import make_trainer, tiny_setup


def _unpadded(batch, i):
    ids = batch["input_ids"][i]
    return ids[batch["attention_mask"][i].bool()].tolist()


def test_eval_batches_are_the_first_sequences_of_the_eval_set_and_leave_the_rng_alone(tmp_path):
    tiny = tiny_setup(n_train=32)
    trainer = make_trainer(tiny, str(tmp_path), per_device_eval_batch_size=8)
    state = torch.get_rng_state()
    batches = eval_batches(trainer, 20)
    assert torch.equal(torch.get_rng_state(), state)
    assert [rows(b) for b in batches] == [8, 8, 4]
    got = [_unpadded(b, i) for b in batches for i in range(rows(b))]
    assert got == [ex["input_ids"] for ex in tiny.eval[:20]]  # in order: the same batches every time
    assert eval_batches(make_trainer(tiny, str(tmp_path), per_device_eval_batch_size=8), 20)[0]["input_ids"].equal(
        batches[0]["input_ids"])
    trainer.eval_dataset = None
    assert eval_batches(trainer, 20) == []


def test_the_judges_batches_are_fixed_at_its_first_call():
    tiny = tiny_setup(n_train=32)
    source = [tiny.collator(tiny.eval[:8])]
    judge = Judge(tiny.model, source, sequences=12)
    first = judge()
    assert judge.rows == 8 and first is not None and len(first.losses) == 8
    source.append(tiny.collator(tiny.eval[8:16]))  # the source grew: the judge's batches did not
    again = judge()
    assert again == first and judge.rows == 8 and judge.calls == 2 and judge.seconds > 0
    assert first == score_model(tiny.model, source[:1])


def test_a_failing_score_is_none_with_one_warning(caplog):
    tiny = tiny_setup(n_train=32)
    bad = [{"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, 5, dtype=torch.long)}]
    judge = Judge(tiny.model, bad, sequences=4)
    with caplog.at_level("WARNING", logger="lossguard"):
        assert judge() is None and judge() is None
    assert caplog.text.count("could not score") == 1


def test_training_rows_keeps_the_first_training_sequences_only():
    tiny = tiny_setup(n_train=32)
    model = tiny.model
    keep = TrainingRows(model, 10)
    model.eval()
    with torch.no_grad():
        model(**tiny.collator(tiny.eval[:8]))  # an evaluation: not kept
    model.train()
    for i in range(3):
        model(**tiny.collator(tiny.train[8 * i:8 * i + 8])).loss.backward()
    assert [rows(b) for b in keep.kept] == [8, 2]
    assert _unpadded(keep.kept[1], 1) == tiny.train[9]["input_ids"]
    assert keep._handle is None  # it removed itself once it had them
    model.zero_grad(set_to_none=True)
