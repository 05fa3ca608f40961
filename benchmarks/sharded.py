"""Snapshots under FSDP2 against DDP: capture time, rollback time and memory per rank, same model.

A full fine-tune of a small Llama (hidden ``--hidden``, ``--layers`` layers, vocabulary 8,192,
untied; AdamW, fp32) on 2 ranks, gloo, CPU. Both arms run in the same invocation, one after the
other, in the same two processes: DDP (every rank holds the whole model and optimizer state) and
FSDP2 (``fully_shard`` per decoder layer and the root: every rank holds its shard). Each arm
trains ``--warm`` steps (so the optimizer has its state), then takes ``--repeats`` snapshots and
as many rollbacks with lossguard's ``Recoverer`` (in memory, no spill). Printed per rank: the
median capture and restore seconds and the snapshot's bytes, then FSDP2 / DDP ratios (rank 0's).

    OMP_NUM_THREADS=1 python benchmarks/sharded.py [--hidden 256] [--layers 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _launch(argv: list[str]) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", __file__, "--worker", *argv]
    return subprocess.call(cmd, env=env)


def _arm(kind: str, args: argparse.Namespace) -> dict[str, float]:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from lossguard.config import RecoveryConfig
    from lossguard.recovery.apply import Recoverer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        trained = model
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(args.warm):
        ids = torch.randint(0, 8192, (2, 64), generator=gen)
        trained(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    rec = Recoverer(model, opt, config=RecoveryConfig(snapshot_memory_mb=1e6, snapshot_every=1))
    captures, restores = [], []
    nbytes = 0
    for i in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        snap = rec.snapshot(i + 1)
        captures.append(time.perf_counter() - t0)
        nbytes = snap.nbytes
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        rec.restore(1)
        restores.append(time.perf_counter() - t0)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    rec.close()
    return {"capture_s": statistics.median(captures), "restore_s": statistics.median(restores),
            "snapshot_mb": nbytes / 2**20, "model_params_mb": whole / 2**20}


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {kind: _arm(kind, args) for kind in ("ddp", "fsdp2")}
    rows = [None, None]
    dist.all_gather_object(rows, results)
    if rank == 0:
        print(f"model: hidden {args.hidden}, {args.layers} layers, {results['ddp']['model_params_mb']:.1f} MB of "
              f"fp32 parameters; AdamW; 2 ranks, gloo, CPU; medians of {args.repeats}")
        print(f"{'arm':6} {'rank':>4} {'snapshot MB':>12} {'capture s':>10} {'rollback s':>11}")
        for kind in ("ddp", "fsdp2"):
            for r, row in enumerate(rows):
                x = row[kind]
                print(f"{kind:6} {r:>4} {x['snapshot_mb']:>12.1f} {x['capture_s']:>10.4f} {x['restore_s']:>11.4f}")
        d, f = results["ddp"], results["fsdp2"]
        print(f"FSDP2 / DDP (rank 0): snapshot memory {f['snapshot_mb'] / d['snapshot_mb']:.3f}, "
              f"capture {f['capture_s'] / d['capture_s']:.2f}, rollback {f['restore_s'] / d['restore_s']:.2f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
    else:
        argv = [a for a in sys.argv[1:] if a != "--worker"]
        sys.exit(_launch(argv))


if __name__ == "__main__":
    main()
