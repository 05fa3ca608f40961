"""GPU check of lossguard under sharded engines: the Trainer with FSDP2 and with DeepSpeed ZeRO-2/3.

    python benchmarks/gpu_sharded_check.py [--gpus N] [--engines fsdp2,fsdp2-recovery,zero2,zero3]

Each engine runs in its own ``torch.distributed.run --nproc_per_node=N`` (NCCL, one GPU a rank):
the tiny Llama (full fine-tune, fp32) through a real ``Trainer`` with ``LossGuard`` attached, a
NaN loss injected at step 8 on the last rank only, 20 steps. Then, per engine, PASS/FAIL of:

* engine: lossguard detected the engine (``run`` record ``engine.kind``, the ZeRO stage);
* line: rank 0 said in one line what is off (FSDP2 without opt-in, ZeRO), nothing where all is on;
* recording: one ``sample`` per step, the loss the mean over ranks, a finite gradient norm before the NaN;
* detection: a ``nonfinite`` finding at step 8, the same findings on every rank;
* recovery (``fsdp2-recovery``: ``LOSSGUARD_SHARDED_RECOVERY=1``): a rollback on every rank to the
  same step, finite parameters at the end, the gathered parameters identical on every rank;
  elsewhere: no rollback was attempted (recovery off, as the line says);
* probe: a recorded skip (``reason: sharded``) when probed, never a verdict.

Exits 1 on any FAIL. Without a GPU (or with fewer than one), prints why and exits 0; an engine
whose package is missing (DeepSpeed) is reported as SKIP with the reason.

``--cpu`` runs the same checks on the CPU with gloo, 2 ranks, to check this script itself where no
GPU is: DeepSpeed runs there (its CPU accelerator); the Trainer's FSDP does not (accelerate runs
DDP on CPU), so the ``fsdp2`` engines FAIL their ``engine`` check there by design.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAN_STEP, STEPS = 8, 20
ENGINES = ("fsdp2", "fsdp2-recovery", "zero2", "zero3")


def _trainer_kwargs(engine: str) -> dict[str, Any]:
    if engine.startswith("fsdp2"):
        return {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2,
                                                       "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    stage = int(engine[-1])
    return {"deepspeed": {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
                          "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                          "gradient_clipping": "auto", "bf16": {"enabled": False}, "fp16": {"enabled": False}}}


def _worker(engine: str, out: Path, cpu: bool) -> None:
    import torch
    from transformers import TrainerCallback

    from lossguard import GuardConfig, LossGuard
    from lossguard.testing.tiny import make_trainer, tiny_setup

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    class NanOnLastRank(TrainerCallback):
        step = 0

        def on_train_begin(self, args, state, control, model=None, **kw):
            def hook(module, a, kwargs, output):
                if self.step == NAN_STEP and module.training and rank == world - 1:
                    output.loss = output.loss * float("nan")
                return output

            model.register_forward_hook(hook, with_kwargs=True)

        def on_step_begin(self, args, state, control, **kw):
            self.step = state.global_step + 1

    setup = tiny_setup(lora=False, n_train=256)
    guard = LossGuard(GuardConfig(console=False, probe={"enabled": True, "every_n_steps": 10},
                                  recovery={"snapshot_every": 5, "rollback_steps": 2, "max_low_lr_steps": 4,
                                            "relapse_watch_steps": 0}))
    trainer = make_trainer(setup, str(out / "run"), callbacks=[guard, NanOnLastRank()], max_steps=STEPS,
                           per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=cpu, logging_steps=50,
                           **({"ddp_backend": "gloo"} if cpu else {}), **_trainer_kwargs(engine))
    trainer.train()
    params = list(trainer.model_wrapped.parameters()) if hasattr(trainer, "model_wrapped") else []
    checksum, finite = [], True
    for p in params:
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        checksum.append(float(full.detach().double().sum()))
        finite = finite and bool(torch.isfinite(full).all())
    (out / f"rank{rank}.json").write_text(json.dumps({
        "engine": guard.engine_info.to_record() if guard.engine_info is not None else None,
        "findings": [f.to_record() for f in guard.findings], "actions": [a.to_record() for a in guard.actions],
        "checksum": checksum, "finite": finite, "world": world}))


def _events(out: Path) -> list[dict[str, Any]]:
    path = out / "run" / "lossguard" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _judge(engine: str, out: Path, world: int, stderr: str) -> list[tuple[str, bool, str]]:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world) if (out / f"rank{r}.json").is_file()]
    if len(ranks) != world:
        return [("run", False, f"{len(ranks)} of {world} ranks finished; stderr tail: {stderr[-600:]!r}")]
    events = _events(out)
    run = next((e for e in events if e["kind"] == "run"), {})
    kind = (run.get("engine") or {}).get("kind")
    want = "fsdp2" if engine.startswith("fsdp2") else "deepspeed"
    res = [("engine", kind == want and (want != "deepspeed" or run["engine"].get("zero_stage") == int(engine[-1])),
            f"run record engine {run.get('engine')}")]
    lines = [line for line in stderr.splitlines() if "lossguard: under" in line or "was asked for" in line]
    expect_line = engine != "fsdp2-recovery"
    res.append(("line", (len(lines) == 1) if expect_line else not lines, f"{lines}"))
    samples = [e for e in events if e["kind"] == "sample"]
    before = [s for s in samples if s["step"] < NAN_STEP]
    res.append(("recording", len(samples) >= STEPS and all(isinstance(s.get("grad_norm"), float) for s in before),
                f"{len(samples)} samples; grad norms before the NaN {[s.get('grad_norm') for s in before][:3]}..."))
    nonfinite = [f for f in ranks[0]["findings"] if f["reason"] == "nonfinite"]
    same = all([f["step"] for f in r["findings"]] == [f["step"] for f in ranks[0]["findings"]] for r in ranks)
    res.append(("detection", bool(nonfinite) and nonfinite[0]["step"] == NAN_STEP and same,
                f"nonfinite at {[f['step'] for f in nonfinite]}; same on every rank: {same}"))
    rollbacks = [[(a["step"], a["to_step"]) for a in r["actions"] if a["action"] == "rollback"] for r in ranks]
    if engine == "fsdp2-recovery":
        ok = bool(rollbacks[0]) and all(rb == rollbacks[0] for rb in rollbacks) and all(r["finite"] for r in ranks) \
            and all(r["checksum"] == ranks[0]["checksum"] for r in ranks)
        res.append(("recovery", ok, f"rollbacks per rank {rollbacks}; finite {[r['finite'] for r in ranks]}"))
    else:
        res.append(("recovery off", not any(rollbacks), f"rollbacks per rank {rollbacks}"))
    probes = [e for e in events if e["kind"] == "probe"]
    res.append(("probe", all(p.get("skipped") for p in probes),
                f"{len(probes)} probe records, reasons {sorted({p.get('reason') for p in probes})}"))
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=0, help="ranks (GPUs) per run; default: all visible")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--cpu", action="store_true", help="check the script itself on CPU (gloo, 2 ranks)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, Path(args.out), args.cpu)
        return
    try:
        import torch
    except ImportError:
        print("no torch: nothing checked")
        return
    if not args.cpu and (not torch.cuda.is_available() or torch.cuda.device_count() < 1):
        print("no GPU visible (torch.cuda.is_available() is False): nothing checked; run this on a machine with "
              "1 or more CUDA GPUs")
        return
    world = 2 if args.cpu else args.gpus or torch.cuda.device_count()
    failed = False
    for engine in args.engines.split(","):
        if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
            print(f"SKIP {engine}: deepspeed is not installed (pip install deepspeed)")
            continue
        with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            if engine == "fsdp2-recovery":
                env["LOSSGUARD_SHARDED_RECOVERY"] = "1"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--worker", engine, "--out", tmp,
                   *(["--cpu"] if args.cpu else [])]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            for name, ok, detail in _judge(engine, Path(tmp), world, proc.stderr + proc.stdout):
                failed |= not ok
                print(f"{'PASS' if ok else 'FAIL'} {engine} {name}: {detail}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
