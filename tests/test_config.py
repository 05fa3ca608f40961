"""Configuration means what it says: every bad value or type is a ValueError naming the field."""

from __future__ import annotations

import logging
from dataclasses import fields

import pytest

from lossguard import GuardConfig, LoopGuard, LossGuard
from lossguard.config import DetectionConfig, GpuConfig, ProbeConfig, RecoveryConfig
from lossguard.records import Reason

SECTIONS = {"detection": DetectionConfig, "recovery": RecoveryConfig, "probe": ProbeConfig, "gpu": GpuConfig}


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_field_of_every_section_refuses_a_wrong_type_by_name(section):
    for f in fields(SECTIONS[section]):
        with pytest.raises(ValueError, match=rf"^{section}\.{f.name}\b"):
            LossGuard(**{section: {f.name: object()}})


def test_strings_are_not_booleans_or_numbers():
    with pytest.raises(ValueError, match=r"^recovery\.enabled='no' must be True or False"):
        LossGuard(recovery={"enabled": "no"})
    with pytest.raises(ValueError, match=r"^console='yes' must be True or False"):
        LossGuard(console="yes")
    with pytest.raises(ValueError, match=r"^detection\.plateau_z='3' must be a number"):
        LossGuard(detection={"plateau_z": "3"})
    with pytest.raises(ValueError, match=r"^detection\.spike_window=True must be an integer"):
        LossGuard(detection={"spike_window": True})
    # an integer is a number; the stored value is the declared type
    assert LossGuard(detection={"plateau_z": 3}).config.detection.plateau_z == 3.0
    assert isinstance(LossGuard(detection={"plateau_z": 3}).config.detection.plateau_z, float)


def test_triggers_name_the_field_and_the_allowed_reasons():
    with pytest.raises(ValueError, match=r"^recovery\.triggers: 'spikes' is not a reason.*allowed: early_convergence, spike,"):
        LossGuard(recovery={"triggers": ["spikes"]})
    with pytest.raises(ValueError, match=r"allowed: .*grad_explosion"):
        LossGuard(recovery={"triggers": ["gave_up"]})  # lossguard's own verdict, not a detector's
    assert LossGuard(recovery={"triggers": "spike"}).config.recovery.triggers == (Reason.SPIKE,)
    assert LossGuard(recovery={"triggers": [Reason.NONFINITE, "divergence"]}).config.recovery.triggers == (
        Reason.NONFINITE, Reason.DIVERGENCE)


def test_false_switches_a_section_off_and_true_keeps_its_defaults():
    config = LossGuard(probe=False, recovery=False, gpu=False).config
    assert (config.probe.enabled, config.recovery.enabled, config.gpu.enabled) == (False, False, False)
    assert config.probe.max_iter == ProbeConfig().max_iter
    assert LossGuard(probe=True).config.probe == ProbeConfig()
    with pytest.raises(ValueError, match=r"^detection=False: the detection section cannot be switched off"):
        LossGuard(detection=False)


def test_unknown_options_are_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown option 'recovry' \(did you mean 'recovery'\?\)"):
        LossGuard(recovry={})
    with pytest.raises(ValueError, match=r"^recovery: unknown option 'enabeld' \(did you mean 'enabled'\?\)"):
        LossGuard(recovery={"enabeld": False})
    with pytest.raises(ValueError, match=r"^probe=None must be a dict of options, a ProbeConfig, True or False"):
        GuardConfig(probe=None)


def test_a_config_object_and_keyword_sections_are_refused_together():
    with pytest.raises(ValueError, match=r"^LossGuard: got a GuardConfig and keyword options \(recovery\)"):
        LossGuard(GuardConfig(), recovery={"enabled": False})
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^LoopGuard: got a GuardConfig and keyword options \(probe\)"):
        LoopGuard(model, opt, config=GuardConfig(), probe=False)
    with pytest.raises(ValueError, match=r"^LossGuard: config=dict must be a GuardConfig"):
        LossGuard({"recovery": {"enabled": False}})


@pytest.mark.slow
def test_probe_false_and_recovery_false_on_a_real_trainer_record_the_run(tiny, tmp_path, caplog):
    from lossguard.telemetry import read_events
    from lossguard.testing.tiny import make_trainer

    guard = LossGuard(probe=False, recovery=False, console=False)
    with caplog.at_level(logging.WARNING, logger="lossguard"):
        make_trainer(tiny, str(tmp_path), callbacks=[guard], max_steps=4).train()
    assert "failed" not in caplog.text
    records = list(read_events(tmp_path / "lossguard" / "events.jsonl"))
    kinds = [r["kind"] for r in records]
    assert kinds.count("run") == 1 and kinds.count("preflight") == 1 and kinds.count("sample") == 4
    run = next(r for r in records if r["kind"] == "run")
    assert run["config"]["probe"]["enabled"] is False and run["config"]["recovery"]["enabled"] is False
    assert guard.recovery is None
