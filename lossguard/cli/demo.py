"""``lossguard demo`` / ``make demo``: a tiny real fine-tune on CPU with LossGuard attached.

The tiny Llama (LoRA on a copy-pretrained base, sequence-reversal task) is trained at a learning
rate that genuinely stalls it near the uniform-prediction loss, the early plateau the user's
notes warn about. LossGuard records every step, detects the premature plateau, rolls back and
retrains at a reduced LR; the summary and an HTML report show what happened.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

DEMO_LR = 3e-2


def command(output_dir: str = "demo-run", steps: int = 600) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import shutil

    from transformers.utils import logging as hf_logging

    from lossguard import LossGuard
    from lossguard.presentation.console import console
    from lossguard.presentation.summary import run_summary
    from lossguard.telemetry import open_run
    from lossguard.testing.tiny import eval_loss, make_trainer, tiny_setup

    hf_logging.set_verbosity_error()
    out = Path(output_dir)
    if (out / "lossguard").exists():
        shutil.rmtree(out / "lossguard")  # a fresh log per demo run
    con = console()
    con.rule("[bold]lossguard demo")
    con.print(f"Fine-tuning a tiny Llama with LoRA on CPU for {steps} steps at lr={DEMO_LR} "
              "(high enough to stall it early), with LossGuard attached.")
    setup = tiny_setup()
    before = eval_loss(setup.model, setup.eval, setup.collator)
    # Its steps take ~8 ms, so one Hessian probe costs more than the default 5% of this short
    # run; the demo allows half, to show the probe's verdict.
    guard = LossGuard(probe={"max_time_fraction": 0.5})
    trainer = make_trainer(setup, str(out), callbacks=[guard], max_steps=steps,
                           learning_rate=DEMO_LR, logging_steps=50, save_strategy="steps", save_steps=200,
                           save_total_limit=2)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = eval_loss(setup.model, setup.eval, setup.collator)
    log = open_run(out)
    con.print(run_summary(log, extra={
        "held-out loss": f"{before:.3f} before -> {after:.3f} after training",
        "train time": f"{seconds:.1f} s",
    }))
    con.print(f"telemetry: {out / 'lossguard' / 'events.jsonl'}")
    try:
        from lossguard.cli.report import command as report

        report(run_dir=str(out), output=None)
    except ImportError:
        pass
    con.print(f"next: [bold]lossguard watch {out} --once[/]  or  [bold]lossguard report {out}[/]")
    return 0
