"""Hessian probe at real scale: time, peak memory and budget on a 26M-parameter full fine-tune on CPU.

The issue's setup (issue 21): a Llama from a config (hidden 512, 8 layers, 1,376 intermediate,
vocabulary 1,024: 26.4M parameters, all trainable), micro-batches of 4 x 64 tokens (a copy task,
the prompt half masked with -100), AdamW. Every variant runs in its own subprocess, so that
peak memory (``VmHWM``, reset through ``/proc/self/clear_refs`` before the part measured) is
that variant's alone; ``--before REF`` runs the probe of an earlier commit (``git archive`` of
``lossguard/`` at REF) in the same invocation.

Part 1, the probe alone on 2 x 64 kept sequences (16 micro-batches a group): a training step
(seconds, peak), then one probe with the budget a 150-step run gives it by default (5% of the
run), before and after, and after again with a larger budget so that it runs. Today's probe gets
the estimate the Trainer integration would hand it (0.75 training steps per product). Part 2, whole
Trainer runs of ``--steps`` steps with a probe forced at step 100 (``every_n_steps``): without
lossguard, with it (default budget, and a larger ``max_time_fraction`` so the probe fits), and
with ``--before-run`` the earlier commit's too.

    nice python benchmarks/probe_scale.py [--steps 150] [--before b92f25b] [--before-run] [--part 1|2]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, INTER, LAYERS, HEADS = 1024, 512, 1376, 8, 8
ROWS, HALF = 4, 32  # micro-batch: 4 sequences of 2 x 32 tokens


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    """Forget the peak RSS (and give freed heap back) so the next ``VmHWM`` is the next block's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2 * HALF,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _examples(n: int, seed: int) -> list[dict[str, list[int]]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        half = torch.randint(4, VOCAB, (HALF,), generator=gen).tolist()
        out.append({"input_ids": half + half, "attention_mask": [1] * (2 * HALF), "labels": [-100] * HALF + half})
    return out


def _collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    import torch

    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def worker_probe(budget: float, lora: int = 0) -> dict[str, Any]:
    """A training step's time and peak, then one probe with ``budget`` seconds: time and peak.
    ``lora``: a LoRA adapter of that rank on every linear layer instead of the full fine-tune."""
    import torch

    from lossguard.config import ProbeConfig
    from lossguard.probes.hessian import probe_model

    torch.set_num_threads(1)
    model = _model()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    data = _examples(128 + 8 * ROWS, seed=1)
    kept = [_collate(data[i:i + ROWS]) for i in range(0, 128, ROWS)]
    train = [_collate(data[i:i + ROWS]) for i in range(128, len(data), ROWS)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3 if lora else 3e-4)
    model.train()

    def step(batch: dict[str, Any]) -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in train[:4]:
        step(b)
    rest = _reset_peak()
    step(train[4])
    step_peak = _status("VmHWM")
    t0 = time.perf_counter()
    for b in train[5:8]:
        step(b)
    step_s = (time.perf_counter() - t0) / 3
    kw = {}
    if "product_seconds" in inspect.signature(probe_model).parameters:
        # what the Trainer integration hands it before any probe has measured a product
        from lossguard.integrations.hf_probe import PRIOR_STEPS

        kw["product_seconds"] = PRIOR_STEPS * step_s
    rest_probe = _reset_peak()
    t0 = time.perf_counter()
    res = probe_model(model, kept, config=ProbeConfig(max_seconds=budget), seed=0, **kw)
    probe_s = time.perf_counter() - t0
    rec = res.to_record()
    return {
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad), "step_s": step_s, "rest": rest,
        "step_peak": step_peak, "rest_probe": rest_probe, "probe_peak": _status("VmHWM"), "probe_s": probe_s,
        "budget": budget, "record": {k: v for k, v in rec.items() if k not in ("groups",)},
    }


def worker_run(steps: int, guard: dict[str, Any] | None) -> dict[str, Any]:
    """One Trainer run; wall seconds, lossguard's hook seconds, probe records, peak RSS."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    torch.set_num_threads(1)
    model = _model()
    callbacks = []
    if guard is not None:
        from lossguard import GuardConfig, LossGuard

        callbacks.append(LossGuard(GuardConfig(console=False, gpu={"enabled": False}, **guard)))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=ROWS, learning_rate=3e-4,
                                 max_steps=steps, logging_steps=10, save_strategy="no", report_to="none",
                                 use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=_examples(steps * ROWS, seed=2),
                          data_collator=_collate, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        _reset_peak()
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        probes = []
        events = Path(out) / "lossguard" / "events.jsonl"
        if events.exists():
            for line in events.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("kind") == "probe":
                    probes.append({k: v for k, v in rec.items() if k not in ("groups", "edge_of_stability")})
    return {"wall": wall, "hook_s": callbacks[0].hook_seconds if callbacks else 0.0, "probes": probes,
            "peak": _status("VmHWM")}


def _spawn(args: list[str], code_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code_dir), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env,
                         cwd=str(code_dir))
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _checkout(ref: str, into: Path) -> Path:
    """``lossguard/`` as it was at ``ref``, extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "lossguard"], capture_output=True, check=True)
    tar_path = into / "old.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return into


def _basis(mem: dict[str, Any] | None) -> str:
    if not mem:
        return "-"
    if mem["basis_place"] == "none":
        return "none (three-term recurrence)"
    return f"{mem['vectors']} x {mem['basis_dtype']} on the {mem['basis_place']}"


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def part1(before: Path | None, steps: int, big_fraction: float, lora: int) -> float:
    print(f"Part 1: the probe alone (2 groups x 16 micro-batches of {ROWS} x {2 * HALF} tokens)")
    first = _spawn(["probe", "1e-9"], ROOT)  # a training step's figures (the probe is skipped at once)
    step_s = first["step_s"]
    default_budget = 0.05 * steps * step_s
    big_budget = big_fraction * steps * step_s
    print(f"  model: {first['params'] / 1e6:.1f}M parameters, all trainable; training step {step_s:.2f} s; "
          f"at rest {_mb(first['rest'])}, step peak {_mb(first['step_peak'])} (+{_mb(first['step_peak'] - first['rest'])})")
    variants = []
    if before is not None:
        variants.append(("before", before, default_budget, 0))
    variants += [("after", ROOT, default_budget, 0), ("after", ROOT, big_budget, 0)]
    if lora:
        variants += [(f"LoRA r={lora}, before", before, big_budget, lora)] if before is not None else []
        variants += [(f"LoRA r={lora}, after", ROOT, big_budget, lora)]
    print(f"  {'code':7s} {'budget':>8s} {'seconds':>8s} {'overrun':>8s} {'products':>8s} {'peak RSS':>10s} "
          f"{'x step peak':>11s}  outcome")
    for name, code, budget, rank in variants:
        r = _spawn(["probe", repr(budget), str(rank)], code)
        if rank:
            print(f"  {name}: {r['params'] / 1e6:.2f}M trainable; training step {r['step_s']:.2f} s, at rest "
                  f"{_mb(r['rest'])}, step peak {_mb(r['step_peak'])} (+{_mb(r['step_peak'] - r['rest'])})")
        rec = r["record"]
        over = r["probe_s"] - budget
        outcome = (f"skipped: {rec['reason']}: {rec['message']}" if rec.get("skipped") else
                   f"{rec['verdict']}, method {rec['method']}, stop {rec.get('stop_reason')}, "
                   f"plan {rec.get('plan')}, basis {_basis(rec.get('memory'))}, "
                   f"{rec.get('product_seconds', 0):.2f} s per micro-batch product")
        print(f"  {name:7s} {budget:7.1f}s {r['probe_s']:7.1f}s {over:+7.1f}s {rec.get('n_hvp', 0):8d} "
              f"{_mb(r['probe_peak']):>10s} {r['probe_peak'] / r['step_peak']:10.2f}x  {outcome}")
        if not rec.get("skipped") and rec.get("memory"):
            mem = rec["memory"]
            print(f"  {'':7s} above rest: probe +{_mb(r['probe_peak'] - r['rest_probe'])} (basis "
                  f"{_mb(mem['basis_bytes'])}, working vectors ~{_mb(mem['work_bytes'])}), training step "
                  f"+{_mb(r['step_peak'] - r['rest'])}")
    return step_s


def part2(before: Path | None, steps: int, big_fraction: float) -> None:
    print(f"\nPart 2: Trainer runs of {steps} steps, a probe forced at step 100")
    probe = {"every_n_steps": 100}
    runs = [("no lossguard", ROOT, None), ("after, default", ROOT, {"probe": probe}),
            (f"after, max_time_fraction {big_fraction}", ROOT,
             {"probe": {**probe, "max_time_fraction": big_fraction, "max_seconds": 600.0}})]
    if before is not None:
        runs.insert(1, ("before, default", before, {"probe": probe}))
    base = None
    for name, code, guard in runs:
        r = _spawn(["run", str(steps), json.dumps(guard)], code)
        base = r["wall"] if base is None else base
        spent = sum(p.get("seconds") or 0.0 for p in r["probes"] if not p.get("skipped"))
        outcomes = "; ".join(
            f"step {p.get('step')}: " + (f"skipped ({p['reason']})" if p.get("skipped") else
                                         f"{p['verdict']} in {p['seconds']:.1f} s, {p['n_hvp']} products, "
                                         f"stop {p.get('stop_reason')}")
            for p in r["probes"])
        print(f"  {name:34s} wall {r['wall']:7.1f} s ({r['wall'] / base:5.2f}x), lossguard hooks {r['hook_s']:6.1f} s "
              f"({r['hook_s'] / max(r['wall'] - r['hook_s'], 1e-9):6.1%} of training), probes {spent:6.1f} s, "
              f"peak RSS {_mb(r['peak'])}; {outcomes or 'no probe'}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind = sys.argv[2]
        if kind == "probe":
            out = worker_probe(float(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
        else:
            out = worker_run(int(sys.argv[3]), json.loads(sys.argv[4]))
        print(json.dumps(out, default=str))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--before", default=None, help="git ref of the probe to compare with (e.g. b92f25b)")
    ap.add_argument("--before-run", action="store_true", help="also a whole Trainer run with the earlier code")
    ap.add_argument("--fraction", type=float, default=1.0,
                    help="max_time_fraction that lets a probe fit (the Trainer run also lifts max_seconds to 600)")
    ap.add_argument("--part", choices=("1", "2", "both"), default="both")
    ap.add_argument("--lora", type=int, default=16, help="also probe a LoRA adapter of this rank (0: no)")
    args = ap.parse_args()
    print(f"probe_scale: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, 1 torch thread per process")
    with tempfile.TemporaryDirectory() as tmp:
        before = _checkout(args.before, Path(tmp)) if args.before else None
        if args.part in ("1", "both"):
            part1(before, args.steps, args.fraction, args.lora)
        if args.part in ("2", "both"):
            part2(before if args.before_run else None, args.steps, args.fraction)


if __name__ == "__main__":
    main()
