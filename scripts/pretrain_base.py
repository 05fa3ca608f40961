"""Rebuild the testbed's pretrained base (``lossguard/testing/testbed/assets``) from scratch.

    OMP_NUM_THREADS=1 python scripts/pretrain_base.py [--out DIR] [--seed 0] [--steps 400]

Trains a byte-level BPE tokenizer and a 1.3M-parameter Llama on the standard library's source and
the pydoc topics of the running Python; writes weights (float16 safetensors), config, tokenizer
and ``pretrain.json`` (seed, settings, timings, loss curve).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    from lossguard.testing.testbed.base import ASSETS
    from lossguard.testing.testbed.pretrain import pretrain

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ASSETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rec = pretrain(args.out, seed=args.seed, steps=args.steps, log=lambda s: print(s, flush=True))
    print(f"done: {rec['parameters']} parameters, held-out loss {rec['final_held_out_loss']:.3f} "
          f"(uniform {rec['uniform_loss']:.3f}); wall {rec['wall_s']:.0f} s, cpu {rec['cpu_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
