"""``gpu-report``: replayed timelines, the live no-driver path, --record, --run and --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest
import typer
from typer.testing import CliRunner

from lossguard.cli.gpu_report import command
from lossguard.errors import LogReadError, LossguardError
from lossguard.gpu.sampler import build_record
from lossguard.gpu.timeline import Timeline, TimelineError
from lossguard.telemetry import EventWriter

DATA = Path(__file__).parent.parent / "data" / "gpu"
app = typer.Typer(add_completion=False)
app.command("gpu-report")(command)
app.command("noop")(lambda: None)  # a second command so typer keeps the subcommand name
runner = CliRunner()


def _nvml_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


no_gpu_here = pytest.mark.skipif(_nvml_present(), reason="this machine has a working NVIDIA driver")


def invoke(*args: str) -> tuple[int, str, BaseException | None]:
    result = runner.invoke(app, ["gpu-report", *args])
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.output, exc


def test_replay_users_case_prints_table_and_diagnosis() -> None:
    code, out, exc = invoke("--replay", str(DATA / "placement_two_gpus.json"))
    assert exc is None and code == 0
    assert "70/80/89%" in out and "17/28/37%" in out
    assert "31250/49140" in out
    assert "warning placement_model_parallel: GPU 0 averaged 80% and GPU 1 28%" in out
    assert "torchrun --nproc_per_node=2" in out
    assert "share of time a kernel was running" in out


def test_replay_json_has_devices_and_diagnoses() -> None:
    code, out, exc = invoke("--replay", str(DATA / "ddp_straggler.json"), "--json")
    assert exc is None and code == 0
    data = json.loads(out)
    assert [d["index"] for d in data["devices"]] == [0, 1, 2, 3]
    assert data["devices"][2]["util_mean"] == pytest.approx(60.6, abs=0.1)
    assert "util_series" not in data["devices"][0]
    (diag,) = data["diagnoses"]
    assert set(diag) == {"kind", "severity", "message", "advice", "evidence"}
    assert diag["kind"] == "rank_imbalance" and diag["evidence"]["lowest_gpu"] == 2
    assert data["n_samples"] == 60


def test_balanced_replay_says_no_diagnosis_and_mig_shows_na() -> None:
    code, out, _ = invoke("--replay", str(DATA / "ddp_balanced.json"))
    assert code == 0 and "No diagnosis: the GPUs look well used." in out
    code, out, _ = invoke("--replay", str(DATA / "mig_unsupported.json"))
    assert code == 0 and "0 (MIG)" in out and "N/A" in out


def test_replay_of_no_driver_recording_is_one_line_exit_0() -> None:
    code, out, _ = invoke("--replay", str(DATA / "no_driver.json"))
    assert code == 0
    assert out.strip().splitlines() == [
        f"no NVIDIA GPU found (NVML: driver library not found) when {DATA / 'no_driver.json'} was recorded"
    ]
    r = runner.invoke(app, ["gpu-report", "--replay", str(DATA / "no_driver.json"), "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and (doc["devices"], doc["nvml_error"]) == ([], "driver library not found")


@no_gpu_here
def test_live_without_driver_is_one_line_exit_0(tmp_path: Path) -> None:
    code, out, exc = invoke("--seconds", "0.1")
    assert exc is None and code == 0
    assert out == "no NVIDIA GPU found (NVML: driver library not found)\n"
    # --json: still JSON on stdout (a pipeline's json.load must not break); the sentence on stderr
    r = runner.invoke(app, ["gpu-report", "--seconds", "0.1", "--json"])
    assert r.exit_code == 0 and r.stderr == "no NVIDIA GPU found (NVML: driver library not found)\n"
    assert json.loads(r.stdout) == {"devices": [], "processes": [], "diagnoses": [], "n_samples": 0, "interval_s": 1.0,
                                    "nvml_error": "driver library not found",
                                    "message": "no NVIDIA GPU found (NVML: driver library not found)"}
    rec = tmp_path / "t.json"
    code, out, _ = invoke("--seconds", "0.1", "--record", str(rec))
    assert code == 0 and Timeline.load(rec).nvml_error == "driver library not found"


def test_user_errors_raise_lossguard_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    _, _, exc = invoke("--replay", str(bad))
    assert isinstance(exc, TimelineError) and str(exc).startswith(str(bad))
    _, _, exc = invoke("--replay", "a.json", "--run", "r")
    assert isinstance(exc, LossguardError) and "cannot be combined" in str(exc)
    _, _, exc = invoke("--replay", "a.json", "--record", "b.json")
    assert isinstance(exc, LossguardError) and "--record" in str(exc)
    _, _, exc = invoke("--seconds", "0")
    assert isinstance(exc, LossguardError) and "must both be > 0" in str(exc)
    _, _, exc = invoke("--run", str(tmp_path / "missing"))
    assert isinstance(exc, LogReadError) and "no such directory" in str(exc)


def _write_run(run_dir: Path, fixture: str, context: dict[str, object] | None = None) -> None:
    t = Timeline.load(DATA / f"{fixture}.json")
    from lossguard.gpu.diagnosis import GpuContext

    with EventWriter(run_dir / "lossguard" / "events.jsonl") as w:
        w.write("run", world_size=1, parallel_mode="not_parallel", max_steps=60)
        for k in range(0, 60, 20):
            w.write("sample", step=k + 1, loss=2.0)
            chunk = Timeline(t.interval_s, t.devices, t.samples[k:k + 20])
            w.write_record(build_record(chunk, GpuContext.from_dict(context), step=k + 20))


def test_run_summarises_gpu_records_of_a_lossguard_run(tmp_path: Path) -> None:
    _write_run(tmp_path, "placement_two_gpus", {"world_size": 1, "hf_device_map": {"a": 0, "b": 1}})
    code, out, exc = invoke("--run", str(tmp_path), "--json")
    assert exc is None and code == 0
    data = json.loads(out)
    assert data["n_records"] == 3 and data["n_samples"] == 60
    assert data["devices"][0]["util_mean"] == 80.0
    (diag,) = data["diagnoses"]
    assert diag["kind"] == "placement_model_parallel"
    assert diag["evidence"]["hf_device_map_gpus"] == [0, 1]
    assert "parallel mode model_parallel, world size 1" in diag["message"]


def test_run_without_gpu_records_says_so(tmp_path: Path) -> None:
    with EventWriter(tmp_path / "lossguard" / "events.jsonl") as w:
        w.write("sample", step=1, loss=2.0)
    code, out, _ = invoke("--run", str(tmp_path))
    assert code == 0 and out.startswith(f"no gpu records in {tmp_path}")


def test_module_entry_point_runs_as_a_subprocess(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lossguard.cli.gpu_report"]
    ok = subprocess.run([*cmd, "--replay", str(DATA / "data_starved.json"), "--json"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert [d["kind"] for d in json.loads(ok.stdout)["diagnoses"]] == ["input_bound"]
    bad = subprocess.run([*cmd, "--replay", str(tmp_path / "nope.json")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'nope.json'}: no such file"
