"""GPU check of the Hessian probe on a real CUDA run: peak memory, seconds, verdict, at two sizes.

    python benchmarks/gpu_probe_check.py [--budget 120] [--sizes small,large] [--seq 1024]

For each size (``small``: a 0.1B Llama, full fine-tune in float32; ``large``: a 1.3B Llama in
bfloat16 with LoRA r=16 on every linear layer), on micro-batches of 4 x ``--seq`` tokens with
PyTorch's SDPA (flash kernels on the GPU):

1. a few AdamW training steps: seconds per step and the peak allocated memory of one step;
2. what the probe predicts before running: ``probe_memory`` (basis, working vectors), the math
   attention a double backward would need (``math_attention_bytes``), free memory;
3. one ``probe_model`` with ``--budget`` seconds on 2 groups x 16 kept micro-batches: seconds
   (and the overrun past the budget, which must stay within one micro-batch product), peak
   allocated memory (against the step's: target <= 1.5x), the method chosen and why, the plan,
   the basis placement, the verdict; and that the graph estimate was not an out-of-memory;
4. with ``--seq 4096`` added, the same at long sequences, where the math-attention estimate
   should send ``auto`` to finite differences on the fused kernels before any double backward.

Prints PASS/FAIL per check and exits 1 on any FAIL; without a GPU, prints why and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

RESULTS: list[tuple[str, bool, str]] = []
SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, dtype, lora rank)
    "small": (768, 2048, 12, 12, 12, 32000, "float32", 0),
    "large": (2048, 5632, 22, 32, 4, 32000, "bfloat16", 16),
}
ROWS = 4


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def build(torch: Any, size: str, seq: int) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab, dtype, rank = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(seq, 4096),
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=getattr(torch, dtype))
    if rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(1)

    def batch() -> dict[str, Any]:
        half = torch.randint(4, vocab, (ROWS, seq // 2), generator=gen)
        ids = torch.cat([half, half], 1)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        return {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda(), "labels": labels.cuda()}

    kept = [{k: v.cpu() for k, v in batch().items()} for _ in range(32)]  # as StepCapture keeps them
    train = [batch() for _ in range(6)]
    return model, kept, train


def run_size(torch: Any, size: str, seq: int, budget: float) -> None:
    from lossguard.config import ProbeConfig
    from lossguard.probes.hessian import CurvatureResult, free_memory, probe_model
    from lossguard.probes.probe_cost import math_attention_bytes, probe_memory

    label = f"{size} @ {ROWS}x{seq}"
    try:
        model, kept, train = build(torch, size, seq)
    except torch.OutOfMemoryError as err:
        check(f"{label}: build", False, f"out of memory building the model ({err})")
        return
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(b: dict[str, Any]) -> None:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in train[:3]:
        step(b)
    torch.cuda.synchronize()
    rest = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in train[3:]:
        step(b)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / 3
    step_peak = torch.cuda.max_memory_allocated()
    dev_free, host_free = free_memory(torch.device("cuda"))
    cfg = model.config
    attn = math_attention_bytes(layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, rows=ROWS, seq_len=seq,
                                value_bytes=2 if "bfloat16" in str(model.dtype) else 4)
    mem30 = probe_memory(n, vectors=30)
    print(f"\n{label}: {n / 1e6:.1f}M trainable; step {step_s:.3f} s; at rest {gib(rest)}, step peak "
          f"{gib(step_peak)}; free on the device {gib(dev_free or 0)}, on the host {gib(host_free or 0)}")
    print(f"  predicted: basis of 30 vectors {gib(mem30.basis_bytes)}, working vectors {gib(mem30.work_bytes)}, "
          f"math attention for a double backward {gib(attn)}")
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        res = probe_model(model, kept, config=ProbeConfig(max_seconds=budget), seed=0,
                          product_seconds=0.75 * step_s)
    except torch.OutOfMemoryError as err:  # probe_model must never let this through
        check(f"{label}: no out-of-memory", False, str(err)[:200])
        return
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    rec = res.to_record()
    check(f"{label}: no out-of-memory", rec.get("reason") != "out_of_memory", rec.get("message", "")[:200])
    if not isinstance(res, CurvatureResult):
        print(f"  skipped: {rec['reason']}: {rec['message']}")
        check(f"{label}: skip is within budget", seconds <= budget + 1.0, f"{seconds:.1f} s of {budget:.0f} s")
        return
    per_mb = rec.get("product_seconds", 0.0) * rec["plan"]["micro_batches"]
    mem = rec["memory"]
    print(f"  probe: {rec['verdict']} (r {rec['ratio']:.3f}), {rec['n_hvp']} products, {seconds:.1f} s of "
          f"{budget:.0f} s, stop {rec['stop_reason']}; method {rec['method']}: {rec['hvp']['why']}")
    print(f"  plan {rec['plan']}; basis {mem['basis_place']} ({mem['vectors']} x {mem['basis_dtype']}): {mem['why']}")
    print(f"  memory: probe peak {gib(peak)} = {peak / step_peak:.2f}x the step's peak; above rest "
          f"{gib(peak - rest)}, predicted {gib(mem['device_bytes'])} (graph measured "
          f"{gib(rec['hvp']['peak_bytes'] or 0)})")
    check(f"{label}: within the budget plus one micro-batch product", seconds <= budget + per_mb + 1.0,
          f"{seconds:.1f} s, budget {budget:.0f} s, one product {per_mb:.2f} s")
    check(f"{label}: probe peak <= 1.5x the step's", peak <= 1.5 * step_peak,
          f"{gib(peak)} against {gib(step_peak)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024])
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("SKIPPED: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device (this check needs a GPU)")
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for size in args.sizes.split(","):
        for seq in args.seq:
            run_size(torch, size, seq, args.budget)
            gc.collect()  # the model and optimizer of that size go before the next
            torch.cuda.empty_cache()
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
