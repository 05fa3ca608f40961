"""LossGuard in a hand-written PyTorch loop: the tiny LoRA model at a learning rate that stalls.

    python examples/custom_loop.py [--steps 600] [--lr 3e-2] [--out custom-loop-run]

Watch the console: an early-convergence finding, a rollback, the reduced-LR phase and the LR
restore appear as they happen; ``<out>/lossguard/events.jsonl`` holds the record
(``lossguard watch <out>`` reads it).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.utils.data import DataLoader
from transformers import get_scheduler

from lossguard import GuardConfig, label_references
from lossguard.integrations.loop import LoopGuard
from lossguard.records import ActionKind
from lossguard.testing.tiny import eval_loss, tiny_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--out", default="custom-loop-run")
    args = parser.parse_args()
    torch.manual_seed(0)
    setup = tiny_setup()
    model = setup.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    loader = DataLoader(setup.train, batch_size=8, shuffle=True, collate_fn=setup.collator,
                        generator=torch.Generator().manual_seed(0))
    epochs = math.ceil(args.steps / len(loader))
    batches = (batch for _ in range(epochs) for batch in loader)
    model.train()
    # the evidence a plateau is weighed against: the unigram level of the training labels (the
    # model's vocabulary gives the uniform level by itself)
    references = label_references(setup.train, setup.collator)
    with LoopGuard(model, optimizer, scheduler, config=GuardConfig(), log_dir=f"{args.out}/lossguard",
                   max_steps=args.steps, references=references) as guard:
        for _, batch in zip(range(args.steps), batches):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if guard.step(loss).stop:
                break
        rollbacks = sum(1 for a in guard.actions if a.action is ActionKind.ROLLBACK)
    print(f"held-out loss {eval_loss(model, setup.eval, setup.collator):.3f} after {guard.global_step} steps, "
          f"{rollbacks} rollback(s); log: {args.out}/lossguard/events.jsonl")


if __name__ == "__main__":
    main()
