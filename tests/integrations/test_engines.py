"""Which engine runs the model, and what lossguard switches off under it (``integrations/engines.py``).

The FSDP2 and DDP cases, and a real Trainer asked for FSDP on CPU, run in ``test_fsdp_loop.py``
(they need two processes); here the arguments' side. DeepSpeed is not installed in CI (``TrainingArguments(deepspeed=...)`` needs it),
so its decision is tested on the arguments' fields that the Trainer would carry.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from lossguard.integrations.engines import EngineKind, detect


@pytest.fixture
def model():
    return torch.nn.Linear(4, 4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_stages_record_and_detect_only(model, stage, tmp_path):
    config = {"zero_optimization": {"stage": stage}, "train_batch_size": "auto"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    for args in (SimpleNamespace(deepspeed=config), SimpleNamespace(deepspeed=str(path)),
                 SimpleNamespace(deepspeed=str(path), hf_deepspeed_config=SimpleNamespace(config=config))):
        engine = detect(model, args=args, world_size=2)
        assert (engine.kind, engine.zero_stage) == (EngineKind.DEEPSPEED, stage)
        assert not engine.recovery and not engine.probe
        line = engine.line()
        assert line.startswith(f"lossguard: under DeepSpeed ZeRO-{stage} lossguard records and detects; "
                               "recovery and the Hessian probe off (")
        assert "\n" not in line


def test_deepspeed_from_accelerate_environment(model, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    engine = detect(model)
    assert (engine.kind, engine.zero_stage, engine.recovery) == (EngineKind.DEEPSPEED, 3, False)
    assert "partitions the parameters themselves" in engine.why


def test_plain_model_keeps_everything_on(model):
    engine = detect(model)
    assert (engine.kind, engine.recovery, engine.probe, engine.line()) == (EngineKind.SINGLE, True, True, None)
    assert detect(None, world_size=2).kind is EngineKind.DDP  # a Trainer that passes no model: by the world size


def test_recovery_ruled_out_means_the_policy_decides_nothing(model):
    """Under DeepSpeed a NaN is found and reported, and nothing is rolled back or given up."""
    from lossguard import GuardConfig
    from lossguard.guard import Guard
    from lossguard.integrations.engines import run_config
    from lossguard.records import Sample

    engine = detect(model, args=SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}))
    config = run_config(GuardConfig(console=False), engine)
    assert not config.recovery.enabled and GuardConfig().recovery.enabled
    guard = Guard(config, max_steps=100)
    found, acted = [], []
    for step in range(1, 8):
        decision = guard.decide(Sample(step=step, loss=float("nan") if step == 5 else 2.0, grad_norm=1.0), [0])
        found += [f.reason.value for f in decision.findings]
        acted += [a.action.value for a in decision.actions]
    assert found == ["nonfinite"] and acted == []
    assert run_config(config, detect(model)) is config  # nothing ruled out: the user's config as it is
