"""Checkpoint inspection on real Trainer + peft checkpoints; nothing is ever unpickled."""

from __future__ import annotations

import builtins
import io
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest

from lossguard.errors import LossguardError
from lossguard.inspection import CheckpointError, FileRole, inspect_path, read_safetensors_header


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 6-step LoRA run saving checkpoint-3 and checkpoint-6, plus a final save_model."""
    from lossguard.testing.tiny import make_trainer, tiny_setup

    out = tmp_path_factory.mktemp("ckrun")
    setup = tiny_setup(pretrain_steps=20, n_train=64)
    trainer = make_trainer(setup, str(out), max_steps=6, save_strategy="steps", save_steps=3, logging_steps=2)
    trainer.train()
    trainer.save_model(str(out))
    trainable, total = setup.model.get_nb_trainable_parameters()
    return {"dir": out, "trainable": trainable, "total": total}


def copy_checkpoint(run, tmp_path, step=6) -> Path:
    dst = tmp_path / f"checkpoint-{step}"
    shutil.copytree(run["dir"] / f"checkpoint-{step}", dst)
    return dst


def test_run_dir_lists_checkpoints_with_contents(run):
    ins = inspect_path(run["dir"])
    assert ins.kind == "run"
    assert [c.step for c in ins.checkpoints] == [3, 6]
    assert ins.final is not None and ins.final.can_swap and not ins.final.can_resume
    assert ins.problems == []
    newest = ins.newest
    assert newest.step == 6 and newest.can_swap and newest.can_resume
    cfg = newest.adapter_config
    assert (cfg.peft_type, cfg.r, cfg.alpha, cfg.dropout, cfg.task_type) == ("LORA", 8, 16.0, 0.0, "CAUSAL_LM")
    assert cfg.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    w = newest.adapter_weights
    assert w.params == run["trainable"]
    assert w.tensors == 2 * 7 * 2  # lora_A + lora_B on 7 linear layers in each of 2 blocks
    assert w.dtypes == {"F32": run["trainable"]}
    assert w.lora_ranks == [8]
    size = (run["dir"] / "checkpoint-6" / "adapter_model.safetensors").stat().st_size
    assert w.size_bytes == size and size > 4 * run["trainable"]
    state = json.loads((run["dir"] / "checkpoint-6" / "trainer_state.json").read_text())
    st = newest.trainer_state
    losses = [e for e in state["log_history"] if "loss" in e]
    assert (st.global_step, st.max_steps) == (6, 6)
    assert st.last_loss == pytest.approx(losses[-1]["loss"]) and st.last_loss_step == losses[-1]["step"]
    roles = {f.name: f.role for f in newest.files}
    assert roles["adapter_config.json"] is FileRole.ADAPTER
    assert roles["adapter_model.safetensors"] is FileRole.ADAPTER
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        assert roles[name] is FileRole.RESUME, name
    notes = {f.name: f.note for f in newest.files}
    assert notes["optimizer.pt"] == "pickle: not opened" and notes["training_args.bin"] == "pickle: not opened"
    sizes = {f.name: f.size_bytes for f in newest.files}
    assert sizes["optimizer.pt"] == (run["dir"] / "checkpoint-6" / "optimizer.pt").stat().st_size


def test_single_checkpoint_dir(run):
    ins = inspect_path(run["dir"] / "checkpoint-3")
    assert ins.kind == "checkpoint" and len(ins.checkpoints) == 1
    assert ins.checkpoints[0].step == 3 and ins.checkpoints[0].trainer_state.global_step == 3


def test_inspection_never_opens_a_pickle(run, monkeypatch):
    import torch

    def refuse(*_a, **_k):
        raise AssertionError("inspection tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    ins = inspect_path(run["dir"])
    assert ins.newest.can_resume
    assert any(p.endswith("adapter_model.safetensors") for p in opened)
    assert not [p for p in opened if p.endswith((".pt", ".pth", ".bin"))]


def test_corrupt_adapter_config_is_a_noted_problem(run, tmp_path):
    ck = copy_checkpoint(run, tmp_path)
    (ck / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    ins = inspect_path(ck)
    info = ins.checkpoints[0]
    assert info.adapter_config is None and not info.can_swap
    assert info.adapter_weights is not None and info.adapter_weights.params == run["trainable"]
    assert len(ins.problems) == 1
    assert "adapter_config.json: truncated JSON" in ins.problems[0]

    (ck / "adapter_config.json").write_text("[1, 2]")
    assert "not an adapter config" in inspect_path(ck).problems[0]


def test_truncated_safetensors(run, tmp_path):
    ck = copy_checkpoint(run, tmp_path)
    weights = ck / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    info = inspect_path(ck).checkpoints[0]
    assert info.adapter_weights is None and not info.can_swap
    header_len = int.from_bytes(data[:8], "little")
    needed = len(data) - 8 - header_len
    assert f"truncated safetensors file (tensor data needs {needed} bytes, file has " in info.problems[0]

    weights.write_bytes(data[:5])
    assert "no header" in inspect_path(ck).problems[0]
    weights.write_bytes(data[:8] + b"{garbage" + b"\0" * (header_len - 8) + data[8 + header_len:])
    assert "corrupt safetensors header" in inspect_path(ck).problems[0]
    empty = ck / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no header"):
        read_safetensors_header(empty)


def test_rank_mismatch_between_config_and_weights(run, tmp_path):
    ck = copy_checkpoint(run, tmp_path)
    cfg = json.loads((ck / "adapter_config.json").read_text())
    cfg["r"] = 4
    (ck / "adapter_config.json").write_text(json.dumps(cfg))
    problems = inspect_path(ck).problems
    assert problems and "r=4 but the weights have rank 8" in problems[0]


def test_missing_resume_files_and_nan_loss(run, tmp_path):
    ck = copy_checkpoint(run, tmp_path)
    (ck / "optimizer.pt").unlink()
    state = json.loads((ck / "trainer_state.json").read_text())
    state["log_history"].append({"step": 6, "loss": float("nan")})
    (ck / "trainer_state.json").write_text(json.dumps(state))  # json writes the NaN literal, as the Trainer does
    info = inspect_path(ck).checkpoints[0]
    assert info.can_swap and not info.can_resume
    assert info.resume_missing == ["optimizer.pt"]
    assert math.isnan(info.trainer_state.last_loss)


def test_full_model_weights_single_and_sharded(tmp_path):
    from lossguard.testing.tiny import build_model, build_tokenizer

    model = build_model(build_tokenizer())
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for name in ("single", "sharded"):
        info = inspect_path(tmp_path / name).checkpoints[0]
        assert info.problems == []
        assert info.model_weights.params == n and info.model_weights.dtypes == {"F32": n}
        assert info.adapter_config is None and not info.can_swap
    assert len(inspect_path(tmp_path / "sharded").checkpoints[0].model_weights.files) > 1
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    shard.unlink()
    problems = inspect_path(tmp_path / "sharded").problems
    assert problems and f"missing {shard.name}" in problems[0]


def test_missing_dir_file_and_empty_dir_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        inspect_path(tmp_path / "nope")
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        inspect_path(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LossguardError, match="no checkpoint here"):
        inspect_path(tmp_path / "empty")
    (tmp_path / "runs" / "b" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "runs" / "a").mkdir()
    partial = inspect_path(tmp_path / "runs" / "b")
    assert partial.kind == "run" and "an interrupted save?" in partial.problems[0]
    with pytest.raises(CheckpointError, match=r"holds 1 run\(s\) \(b\); inspect one of them"):
        inspect_path(tmp_path / "runs")


def test_to_dict_is_plain_json(run):
    d = inspect_path(run["dir"]).to_dict()
    text = json.dumps(d)
    back = json.loads(text)
    assert back["kind"] == "run"
    assert back["checkpoints"][1]["swap_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert "optimizer.pt" in back["checkpoints"][1]["resume_only_files"]


def test_lossguard_state_is_classified_as_resume_only():
    from lossguard.inspection import FileRole, _classify

    assert _classify("lossguard_state.json") is FileRole.RESUME
    assert _classify("adapter_model.safetensors") is FileRole.ADAPTER
