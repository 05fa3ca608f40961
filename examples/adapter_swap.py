"""Two LoRA adapters, one base model: train, inspect the checkpoints, load both, swap between them.

Runs offline on CPU in well under 30 seconds with lossguard's tiny Llama:

    python examples/adapter_swap.py [--out DIR]

1. Trains a "reverse" adapter and a "copy" adapter on the same (copy-pretrained) base model with
   a real ``Trainer`` that saves ``checkpoint-N`` directories.
2. Inspects the runs with ``lossguard.inspection.inspect_path``: only ``adapter_config.json`` and
   ``adapter_model.safetensors`` are needed to swap; optimizer, scheduler and RNG files only to
   resume training (they are pickles and are never opened).
3. Loads a fresh base model once, attaches the first adapter with ``PeftModel.from_pretrained``,
   the second with ``load_adapter``, and switches with ``set_adapter``. (Calling
   ``PeftModel.from_pretrained`` twice on the same base would wrap it twice.)
4. Shows each adapter is the better one on its own task (held-out loss and a greedy answer).

Exit code 0 when each adapter wins on its own task, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS = ("reverse", "copy")
TRAIN_STEPS = {"reverse": 300, "copy": 150}
LEARNING_RATE = 1e-2


def train_adapter(task: str, run_dir: Path, steps: int) -> Path:
    """Train one LoRA adapter on ``task``; returns its newest checkpoint directory."""
    from transformers import Trainer

    from lossguard.testing.tiny import (
        PadCollator,
        add_lora,
        build_dataset,
        build_tokenizer,
        pretrained_base,
        training_args,
    )

    tok = build_tokenizer()
    model = add_lora(pretrained_base(tok))
    trainer = Trainer(
        model=model,
        args=training_args(
            str(run_dir),
            max_steps=steps,
            learning_rate=LEARNING_RATE,
            logging_steps=25,
            save_strategy="steps",
            save_steps=steps // 2,
        ),
        train_dataset=build_dataset(tok, 512, seed=1, task=task),
        data_collator=PadCollator(tok.pad_token_id),
    )
    trainer.train()
    return run_dir / f"checkpoint-{steps}"


def describe(run_dir: Path) -> None:
    """Print what each checkpoint of a run holds (no pickle is opened)."""
    from lossguard.inspection import FileRole, inspect_path

    ins = inspect_path(run_dir)
    for ck in ins.checkpoints:
        cfg, w = ck.adapter_config, ck.adapter_weights
        swap = [f.name for f in ck.files if f.role is FileRole.ADAPTER]
        resume = [f.name for f in ck.files if f.role is FileRole.RESUME]
        loss = ck.trainer_state.last_loss if ck.trainer_state else None
        print(f"  {Path(ck.path).name}: LoRA r={cfg.r if cfg else '?'}, "
              f"{w.params if w else '?'} adapter params, last loss {loss if loss is None else round(loss, 3)}; "
              f"swap needs {' + '.join(swap)} ({ck.bytes_for(FileRole.ADAPTER)} B); "
              f"resume also needs {', '.join(resume)} ({ck.bytes_for(FileRole.RESUME)} B)")
        if ck.problems:
            print(f"  problems: {'; '.join(ck.problems)}")


def greedy_answer(model: Any, tok: Any, symbols: Sequence[str]) -> str:
    """The model's greedy answer to one prompt, as text."""
    import torch

    prompt = tok.convert_tokens_to_ids(["<s>", "rev", ":", *symbols, "=>"])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(len(symbols) + 1):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == tok.eos_token_id:
                break
    return " ".join(tok.convert_ids_to_tokens(ids[0, len(prompt):].tolist()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for the two runs (default: a temporary directory)")
    opts = parser.parse_args(argv)

    import torch
    from peft import PeftModel

    from lossguard.testing.tiny import PadCollator, build_dataset, build_tokenizer, eval_loss, pretrained_base

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(opts.out or tmp)
        checkpoints = {}
        for task in TASKS:
            print(f"training the {task!r} adapter for {TRAIN_STEPS[task]} steps")
            checkpoints[task] = train_adapter(task, root / f"{task}-lora", TRAIN_STEPS[task])
            describe(root / f"{task}-lora")

        tok = build_tokenizer()
        collate = PadCollator(tok.pad_token_id)
        held_out = {task: build_dataset(tok, 64, seed=10_000, task=task) for task in TASKS}

        model = PeftModel.from_pretrained(pretrained_base(tok), str(checkpoints["reverse"]), adapter_name="reverse")
        model.load_adapter(str(checkpoints["copy"]), adapter_name="copy")
        model.eval()

        with model.disable_adapter():
            base = {task: eval_loss(model, held_out[task], collate) for task in TASKS}
        losses: dict[str, dict[str, float]] = {}
        example = ["d", "o", "g"]
        print("\nheld-out loss (lower is better); base model: "
              + ", ".join(f"{t} {base[t]:.3f}" for t in TASKS))
        for adapter in TASKS:
            model.set_adapter(adapter)
            losses[adapter] = {task: eval_loss(model, held_out[task], collate) for task in TASKS}
            print(f"  adapter {adapter!r:10} " + ", ".join(f"{t} {losses[adapter][t]:.3f}" for t in TASKS)
                  + f"   answer to 'rev : {' '.join(example)} =>': {greedy_answer(model, tok, example)}")

    wins = all(losses[task][task] < losses[other][task] for task in TASKS for other in TASKS if other != task)
    print("each adapter is best on its own task" if wins else "an adapter did NOT win on its own task")
    return 0 if wins else 1


if __name__ == "__main__":
    sys.exit(main())
