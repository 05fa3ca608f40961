"""What `make demo` runs: a tiny real LoRA fine-tune on CPU with LossGuard attached.

    python examples/tiny_cpu.py [--output-dir demo-run] [--steps 600]

Builds a ~94k-parameter Llama from a config, a word-level tokenizer trained locally, and a
sequence-reversal dataset whose prompt tokens are masked with -100; nothing is downloaded.
"""

import argparse
import sys

from lossguard.cli.demo import command

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="demo-run")
    ap.add_argument("--steps", type=int, default=600)
    ns = ap.parse_args()
    sys.exit(command(output_dir=ns.output_dir, steps=ns.steps))
