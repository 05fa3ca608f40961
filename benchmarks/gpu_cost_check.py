"""GPU check of the recovery cost model on a real CUDA run: predicted against measured.

    python benchmarks/gpu_cost_check.py [--sizes full,lora] [--budget 30] [--spill-dir DIR]

About 4 minutes a size on an H100-class GPU (estimated: not yet run on one).

For each size (``full``: a 0.55B Llama, full fine-tune in float32 with AdamW, 6.6 GB a snapshot;
``lora``: a 1.3B Llama in bfloat16 with LoRA r=16 on every linear layer), after a few AdamW steps:

1. the cost model as lossguard measures it at train begin (``recovery.cost.measure_cost``: a
   128 MB sample copied into pinned memory and checked finite, median of three; the spill
   folder's writer; the probe's basis and working vectors against the free device memory);
2. snapshot capture, measured: ``Capturer.capture(require_finite=True)`` through the pinned
   side-stream path of ``recovery/snapshot.py``, from the call until its copies have completed
   (the first capture allocates its pinned buffers, reported apart; the median of the next
   three, which reuse them, is compared), and the host-copy bandwidth that implies; one
   training step with a snapshot in flight against one without (what the overlap costs);
3. one spill of that snapshot (``save_snapshot``, fsynced) against the predicted spill;
4. probe memory: ``probe_model`` on kept micro-batches, its peak allocated memory above what
   training holds at rest against the probe's own prediction (basis, working vectors and the
   graph it measured); then the same with a replayed free-memory reading at the hardware
   boundary that leaves no room for a device basis (the basis goes to the host or is not
   kept, and nothing runs out of memory); then an out-of-memory raised inside the probe, after
   which the allocator's cache must be back to what it held before the probe.

Prints predicted against measured with PASS/FAIL (within 25%) per figure and exits 1 on any
FAIL; without a GPU, prints why and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS: list[tuple[str, bool, str]] = []
TOLERANCE = 0.25
CPU = False  # --cpu: the same steps on a tiny model on the CPU, to check the script, not the figures
SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, dtype, lora rank)
    "full": (1536, 4096, 16, 12, 12, 32000, "float32", 0),
    "lora": (2048, 5632, 22, 32, 4, 32000, "bfloat16", 16),
    "tiny": (64, 128, 2, 4, 4, 1000, "float32", 0),  # --cpu
}
ROWS, SEQ = 4, 512


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def compare(name: str, predicted: float | None, measured: float, unit: str) -> None:
    """Predicted against measured, PASS within ``TOLERANCE``; with --cpu printed only (a tiny model's
    times are overheads, and a CPU has no allocator statistics)."""
    if predicted is None or measured <= 0:
        detail = f"predicted {predicted}, measured {measured:.4g} {unit}: nothing to compare"
        if CPU:
            print(f"INFO {name}: {detail}")
        else:
            check(name, False, detail)
        return
    err = predicted / measured - 1
    detail = f"predicted {predicted:.4g} {unit}, measured {measured:.4g} {unit} ({err:+.0%})"
    if CPU:
        print(f"INFO {name}: {detail}")
    else:
        check(name, abs(err) <= TOLERANCE, detail)


class Device:
    """The CUDA calls this script makes; on the CPU (--cpu) they read nothing and wait for nothing."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.name = "cpu" if CPU else "cuda"

    def sync(self) -> None:
        if not CPU:
            self.dev.sync()

    def allocated(self) -> int:
        return 0 if CPU else self.torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        if not CPU:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return 0 if CPU else self.torch.cuda.max_memory_allocated()

    def reserved(self) -> int:
        return 0 if CPU else self.torch.cuda.memory_reserved()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def build(torch: Any, size: str) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab, dtype, rank = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=SEQ,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device="cpu" if CPU else "cuda", dtype=getattr(torch, dtype))
    if rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(1)

    def batch() -> dict[str, Any]:
        ids = torch.randint(4, vocab, (ROWS, SEQ), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    kept = [batch() for _ in range(4)]  # on the host, as the callback keeps them
    train = [{k: v.to(model.device) for k, v in batch().items()} for _ in range(4)]
    return model, kept, train


def run_size(torch: Any, size: str, budget: float, spill_root: Path) -> None:
    from lossguard.config import ProbeConfig
    from lossguard.probes.hessian import CurvatureResult, free_memory, probe_model
    from lossguard.probes.probe_cost import probe_memory
    from lossguard.recovery.cost import measure_cost
    from lossguard.recovery.snapshot import Capturer, save_snapshot

    dev = Device(torch)
    model, kept, train = build(torch, size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    cap = Capturer(model, opt)

    def step(b: dict[str, Any], in_flight: bool = False) -> float:
        dev.sync()
        t0 = time.perf_counter()
        model(**b).loss.backward()
        if in_flight:
            cap.fence()  # what the Recoverer's pre-step hook does: the device waits for the copies
        opt.step()
        opt.zero_grad(set_to_none=True)
        dev.sync()
        return time.perf_counter() - t0

    for b in train[:2]:
        step(b)  # the optimizer's state exists from here
    with tempfile.TemporaryDirectory(dir=spill_root) as spill:
        cost = measure_cost(model, opt, memory_mb=512.0, spill_dir=Path(spill), max_steps=None,
                            free_memory=free_memory, probe_memory=lambda k: probe_memory(k, vectors=30).device_bytes)
        label = f"{size} ({cost.trainable_params / 1e6:.1f}M trainable, {cost.snapshot_bytes / 1e9:.2f} GB a snapshot)"
        print(f"\n{label}: cost model {cost.summary()}")

        def timed_capture(k: int) -> tuple[float, Any]:
            dev.sync()
            t0 = time.perf_counter()
            snap = cap.capture(k, require_finite=True)
            assert snap is not None, "a finite model refused as non-finite"
            snap._flat.wait()  # until the side stream's copies have completed
            return time.perf_counter() - t0, snap

        first_s, snap = timed_capture(1)
        snap.params = None  # its pinned buffers go back to the pool, as once a snapshot has spilled
        times = []
        for k in range(3):
            seconds, snap = timed_capture(2 + k)
            times.append(seconds)
            if k < 2:
                snap.params = None
        measured = statistics.median(times)
        print(f"  capture: first {first_s:.3f} s (allocates pinned buffers), then {[round(t, 3) for t in times]} s")
        compare(f"{size}: capture seconds", cost.capture_seconds, measured, "s")
        compare(f"{size}: host-copy bandwidth", cost.capture_bytes_per_s, snap.nbytes / measured, "B/s")

        plain = statistics.median(step(b) for b in train[2:4])
        spare = cap.capture(9, require_finite=True)
        overlapped = step(train[2], in_flight=True)
        print(f"  a training step {plain:.3f} s alone, {overlapped:.3f} s with a snapshot in flight "
              f"(+{overlapped - plain:.3f} s against a {measured:.3f} s capture)")
        del spare

        t0 = time.perf_counter()
        save_snapshot(snap, Path(spill) / "spill")
        compare(f"{size}: spill seconds", cost.spill_seconds, time.perf_counter() - t0, "s")
        del snap
    gc.collect()
    dev.sync()

    opt.zero_grad(set_to_none=True)
    rest = dev.allocated()
    dev.reset_peak()
    res = probe_model(model, kept, config=ProbeConfig(max_seconds=budget, groups=1), seed=0)
    peak = dev.peak() - rest
    rec = res.to_record()
    check(f"{size}: probe ran", isinstance(res, CurvatureResult), str(rec.get("message", rec.get("verdict")))[:200])
    if isinstance(res, CurvatureResult):
        mem = rec["memory"]
        print(f"  probe: {rec['verdict']}, {rec['n_hvp']} products, method {rec['method']}; basis {mem['basis_place']} "
              f"({mem['vectors']} x {mem['basis_dtype']}); cost model's row (basis + working vectors, no graph) "
              f"{gib(cost.probe_bytes or 0)}")
        compare(f"{size}: probe memory above rest", mem["device_bytes"], peak, "B")

    def no_room(device: Any) -> tuple[int | None, int | None]:
        device_free, host = free_memory(device)
        small = probe_memory(cost.trainable_params, vectors=12)
        # half of it (max_memory_fraction) holds the working vectors and half of a float32 basis
        room = 2 * small.work_bytes + small.basis_bytes
        return (None, room) if CPU else (min(device_free or 0, room), host)  # on a CPU the host is the device

    tight = probe_model(model, kept, config=ProbeConfig(max_seconds=budget, groups=1, max_iter=12, min_iter=10),
                        seed=0, read_memory=no_room, return_direction=True)
    trec = tight.to_record()
    where = trec.get("memory", {})
    check(f"{size}: no device room: basis off the device, no out-of-memory",
          trec.get("reason") != "out_of_memory" and (where.get("basis_place") in ("host", "none", None)
                                                     or where.get("basis_dtype") == "bfloat16"),
          f"{trec.get('verdict', trec.get('reason'))}; basis {where.get('basis_place')} {where.get('basis_dtype')}: "
          f"{where.get('why', trec.get('message', ''))}"[:240])

    dev.sync()
    reserved = dev.reserved()
    calls = [0]

    def runs_out(*_: Any) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (raised by gpu_cost_check)")

    handle = model.register_forward_pre_hook(runs_out)
    oom = probe_model(model, kept, config=ProbeConfig(max_seconds=budget, groups=1), seed=0)
    handle.remove()
    after = dev.reserved()
    check(f"{size}: an out-of-memory in the probe is caught and the cache emptied",
          oom.to_record().get("reason") == "out_of_memory" and after <= reserved,
          f"reason {oom.to_record().get('reason')}; reserved {gib(reserved)} before, {gib(after)} after")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="full,lora")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per probe (three probes per size)")
    ap.add_argument("--spill-dir", default=tempfile.gettempdir(), help="where the spill is measured and written")
    ap.add_argument("--cpu", action="store_true", help="check the script itself on the CPU: a tiny model, figures "
                    "printed only (no pinned copies, no allocator statistics)")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("SKIPPED: torch is not installed")
        return 0
    global CPU
    CPU = args.cpu
    if not CPU and not torch.cuda.is_available():
        print("SKIPPED: no CUDA device (this check needs a GPU); nothing was measured")
        return 0
    print(f"CPU check of the script itself, torch {torch.__version__}" if CPU
          else f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for size in ["tiny"] if CPU else args.sizes.split(","):
        try:
            run_size(torch, size, args.budget, Path(args.spill_dir))
        except torch.OutOfMemoryError as err:
            check(f"{size}: ran", False, f"out of memory outside the probe ({str(err)[:160]})")
        except Exception as err:  # noqa: BLE001 - one size failing says so and the next still runs
            check(f"{size}: ran", False, f"{type(err).__name__}: {str(err)[:200]}")
        gc.collect()
        if not CPU:
            torch.cuda.empty_cache()
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
