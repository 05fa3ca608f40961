"""Recovery sized to the run, simulated at scale on a CPU: snapshot cost with and without the budget.

A full fine-tune of a ~100M-parameter Llama (hidden 768, 12 layers, intermediate 2,048,
vocabulary 8,192, untied: 98M parameters, all trainable; AdamW, fp32), micro-batches of 1 x 64
tokens, ``--steps`` optimizer steps, checkpoints every ``--save-steps`` (``save_total_limit=1``) in
every arm. Each arm runs in its own subprocess (peak RSS through ``VmHWM``):

* baseline: no lossguard;
* naive: ``LossGuard`` with a fixed ``snapshot_every`` (``--naive-every``, 5): every snapshot
  copies 1.2 GB and, past ``snapshot_memory_mb`` (512), spills one to disk. On a 7B full
  fine-tune at ~1 s a step the default 50-step cadence costs about as much (84 GB per snapshot:
  minutes of copying and writing per 50 s of training); here a CPU step is slower and memory
  faster, so a shorter fixed cadence reproduces that share;
* budget: ``LossGuard()`` as shipped: the cadence chosen after the first timed steps so that
  snapshots stay within ``recovery.snapshot_budget`` (1%), the Trainer's checkpoints as rollback
  targets where that cadence is coarser than ``rollback_steps``.

Printed: wall time against the baseline, lossguard's time in snapshots and spills (and in the
train-begin measurements) as a share of the arm's wall time, the rollback targets held at the end,
and the cost model's predictions (made at train begin) against what the naive arm measured:
capture seconds, spill seconds, the share of training time at the naive cadence, host memory,
with the machine's load average at train begin and over the steps beside them (on a shared
machine the times move with the load; the bytes do not).

    nice python benchmarks/snapshot_budget.py [--steps 60] [--naive-every 5] [--save-steps 30] [--tiny]
        [--arms naive,budget]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, INTER, LAYERS, HEADS, TOKENS = 8192, 768, 2048, 12, 12, 64


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def _examples(n: int) -> list[dict[str, list[int]]]:
    import torch

    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB, (TOKENS,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * TOKENS, "labels": ids})
    return out


def _collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    import torch

    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def worker(arm: str, steps: int, naive_every: int, save_steps: int, tiny: bool = False) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden, inter, layers = (64, 128, 2) if tiny else (HIDDEN, INTER, LAYERS)  # tiny: checks the script
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4 if tiny else HEADS, num_key_value_heads=4 if tiny else HEADS, max_position_embeddings=TOKENS,
        tie_word_embeddings=False))
    callbacks: list[Any] = []
    guard = None
    seen: dict[str, Any] = {}
    if arm != "baseline":
        from lossguard import GuardConfig, LossGuard

        recovery = {"snapshot_every": naive_every} if arm == "naive" else {}
        guard = LossGuard(GuardConfig(console=False, gpu=False, recovery=recovery))
        callbacks.append(guard)

        class Last(TrainerCallback):  # the rollback targets, before train end frees them
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                seen["load_begin"] = os.getloadavg()[0]  # right after lossguard measured the cost

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                seen.setdefault("loads", []).append(os.getloadavg()[0])
                rec = guard.recovery.recoverer if guard.recovery is not None else None
                if rec is not None and state.global_step == steps:
                    seen["targets"] = [(s, rec.ring._snaps[s].meta.get("source", "snapshot"),
                                        "disk" if rec.ring._snaps[s].on_disk else "memory") for s in rec.ring.steps()]
                    seen["capture"] = list(rec.capture_seconds)
                    seen["spill"] = list(rec.spill_seconds)
                    seen["snapshot_s"] = rec.snapshot_seconds
                    seen["n"] = rec.n_snapshots
                    seen["nbytes"] = max((sn.nbytes for sn in rec.ring._snaps.values()), default=0)

        callbacks.append(Last())
    with tempfile.TemporaryDirectory(dir=os.environ.get("SNAPSHOT_BENCH_DIR")) as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, learning_rate=1e-4,
                                 max_steps=steps, logging_steps=10, save_strategy="steps", save_steps=save_steps,
                                 save_total_limit=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                                 dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=_examples(steps), data_collator=_collate,
                          callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        rest = _reset_peak()
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        records: dict[str, Any] = {}
        events = Path(out) / "lossguard" / "events.jsonl"
        if events.exists():
            for line in events.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("kind") in ("run", "cost"):
                    records.setdefault(rec["kind"], []).append(rec)
            samples = [json.loads(line) for line in events.read_text().splitlines() if '"sample"' in line]
            seen["step_s"] = sorted(s["step_time_s"] for s in samples if s.get("step_time_s"))
    return {"arm": arm, "wall": wall, "hook_s": guard.hook_seconds if guard else 0.0, "rest": rest,
            "peak": _status("VmHWM"), "params": sum(p.numel() for p in model.parameters()), **seen,
            "run_cost": (records.get("run") or [{}])[0].get("cost"), "cost": records.get("cost", [])}


def _spawn(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _compare(n: dict[str, Any], base: dict[str, Any], a: Any) -> None:
    """The cost model, predicted at train begin in the naive arm, against what that arm measured."""
    from lossguard.recovery.budget import SnapshotCost, choose_cadence

    cost = SnapshotCost(**{k: v for k, v in n["run_cost"].items() if k in SnapshotCost.__dataclass_fields__})
    step_s = _median(n.get("step_s", []))  # a step's own time (snapshots are taken after it ends)
    loads = n.get("loads") or [float("nan")]
    print(f"\n  cost model (predicted at train begin, naive arm) against measured; load average (1 min, "
          f"{os.cpu_count()} CPUs) {n.get('load_begin', float('nan')):.2f} at train begin, "
          f"{_median(loads):.2f} median over the steps (range {min(loads):.2f}-{max(loads):.2f}):")
    check = cost.param_bytes / cost.check_bytes_per_s if cost.check_bytes_per_s else 0.0
    print(f"    capture predicted as {cost.snapshot_bytes / 1e9:.2f} GB copied at "
          f"{(cost.capture_bytes_per_s or 0) / 1e9:.2f} GB/s + {cost.param_bytes / 1e9:.2f} GB of parameters "
          f"checked finite in {check:.3f} s")
    rows = [("snapshot bytes", cost.snapshot_bytes, n.get("nbytes"), _gb),
            ("capture s", cost.capture_seconds, _median(n.get("capture", [])), lambda x: f"{x:.3f} s"),
            ("spill s", cost.spill_seconds, _median(n.get("spill", [])), lambda x: f"{x:.3f} s")]
    naive = choose_cadence(cost, step_seconds=step_s, budget=1.0, rollback_steps=100, max_steps=a.steps,
                           user_every=a.naive_every)
    trained = sum(n.get("step_s", [])) or float("nan")
    rows.append(("snapshot share of training", naive.share, n.get("snapshot_s", 0.0) / trained, lambda x: f"{x:.2%}"))
    rows.append(("host memory of snapshots", cost.host_bytes(a.naive_every, a.steps), n["peak"] - base["peak"], _gb))
    for name, pred, meas, fmt in rows:
        if pred is None or meas is None:
            continue
        print(f"    {name:28s} predicted {fmt(pred):>10s}  measured {fmt(meas):>10s}  ({pred / meas - 1:+.0%})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                                sys.argv[6] == "tiny")))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--naive-every", type=int, default=5)
    ap.add_argument("--save-steps", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="a 1M-parameter model: checks the script in seconds")
    ap.add_argument("--arms", default="naive,budget",
                    help="which arms to run besides the baseline (naive alone: the cost model's check)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    print(f"snapshot_budget: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, 1 torch thread per process; "
          f"{a.steps} steps, checkpoints every {a.save_steps}")
    arms = ["baseline"] + [arm for arm in ("naive", "budget") if arm in a.arms.split(",")]  # baseline: always
    res = {arm: _spawn([arm, str(a.steps), str(a.naive_every), str(a.save_steps), "tiny" if a.tiny else "full"])
           for arm in arms}
    base = res["baseline"]
    print(f"  model: {base['params'] / 1e6:.1f}M parameters, all trainable (AdamW, fp32)")
    print(f"  {'arm':9s} {'wall':>8s} {'x base':>7s} {'snapshots':>9s} {'in them':>8s} {'of wall':>8s} "
          f"{'hooks':>7s} {'peak RSS':>9s}  rollback targets at the end / cadence")
    for arm in arms:
        r = res[arm]
        snap_s = r.get("snapshot_s", 0.0)
        targets = ", ".join(f"{s} ({src}, {where})" for s, src, where in r.get("targets", [])) or "-"
        cadence = r["cost"][0]["cadence"]["message"] if r.get("cost") else ""
        print(f"  {arm:9s} {r['wall']:7.1f}s {r['wall'] / base['wall']:6.3f}x {r.get('n', 0):9d} {snap_s:7.1f}s "
              f"{snap_s / r['wall']:7.2%} {r['hook_s']:6.1f}s {_gb(r['peak']):>9s}  {targets}"
              + (f"; {cadence}" if cadence else ""))
    if "naive" in res:
        _compare(res["naive"], base, a)
    if "budget" not in res:
        return
    b = res["budget"]
    bc = b["cost"][0] if b.get("cost") else {}
    print(f"\n  budget arm: cadence {bc.get('every')} ({bc.get('cadence', {}).get('reason')}), "
          f"predicted share {bc.get('cadence', {}).get('share')}; line: {bc.get('line')}")
    measure_s = b["hook_s"] - b.get("snapshot_s", 0.0)
    print(f"  budget arm: snapshots {b.get('snapshot_s', 0.0):.2f} s = {b.get('snapshot_s', 0.0) / b['wall']:.2%} of wall; "
          f"all of lossguard's hooks (cost measurement at train begin included) {b['hook_s']:.2f} s = "
          f"{b['hook_s'] / b['wall']:.2%} (hooks without snapshots {measure_s:.2f} s)")


if __name__ == "__main__":
    main()
