"""Pretrain the testbed's base on the standard library and the pydoc topics (a few CPU minutes).

A byte-level BPE tokenizer is trained on the same text; the model sees random 128-token windows,
a fifth of them from the pydoc topics (English), the rest from source code. A few documents are
held out to measure the loss the model reaches on text it has not seen.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lossguard.testing.testbed.base import CONFIG, RECORD, SPECIAL_TOKENS, TOKENIZER, WEIGHTS, model_config
from lossguard.testing.testbed.text import Document, code_documents, digest, python_version, topic_documents

HELD_OUT_EVERY = 50  # every 50th document (by name) is held out of pretraining


def train_tokenizer(docs: list[Document], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    return tok


def _stream(tok: Any, docs: list[Document]) -> list[int]:
    eos = tok.token_to_id("</s>")
    out: list[int] = []
    for enc in tok.encode_batch([d.text for d in docs]):
        out.extend(enc.ids)
        out.append(eos)
    return out


def pretrain(out_dir: Path, *, seed: int = 0, steps: int = 400, batch: int = 16, context: int = 128,
             lr: float = 3e-3, vocab_size: int = 2048, topic_share: float = 0.2, eval_every: int = 25,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train tokenizer and model, write the four asset files to ``out_dir``, return the record."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    wall0, cpu0 = time.perf_counter(), time.process_time()
    random.seed(seed)
    torch.manual_seed(seed)
    code, topics = code_documents(), topic_documents()
    held = [d for i, d in enumerate(code + topics) if i % HELD_OUT_EVERY == 0]
    held_names = {d.name for d in held}
    code_tr = [d for d in code if d.name not in held_names]
    topic_tr = [d for d in topics if d.name not in held_names]
    tok = train_tokenizer(code_tr + topic_tr, vocab_size)
    code_ids = torch.tensor(_stream(tok, code_tr), dtype=torch.long)
    topic_ids = torch.tensor(_stream(tok, topic_tr), dtype=torch.long)
    held_ids = torch.tensor(_stream(tok, held), dtype=torch.long)
    t_data = time.perf_counter() - wall0
    log(f"tokenizer and data: {t_data:.1f} s; {len(code_tr)} code files ({len(code_ids)} tokens), "
        f"{len(topic_tr)} topics ({len(topic_ids)} tokens), {len(held)} held out ({len(held_ids)} tokens)")

    gen = torch.Generator().manual_seed(seed)

    def windows(ids: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - context - 1, (n,), generator=g)
        return torch.stack([ids[s:s + context + 1] for s in starts.tolist()])

    held_batch = windows(held_ids, 64, torch.Generator().manual_seed(seed + 1))
    model = LlamaForCausalLM(model_config(tok.get_vocab_size()))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(steps // 20, 1)

    def schedule(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    @torch.no_grad()
    def held_loss() -> float:
        model.eval()
        total = sum(float(model(input_ids=b[:, :-1], labels=b[:, :-1]).loss) for b in held_batch.split(16))
        model.train()
        return total / math.ceil(len(held_batch) / 16)

    curve: list[dict[str, Any]] = []
    n_topic = round(batch * topic_share)
    model.train()
    t_train = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.cat([windows(code_ids, batch - n_topic, gen), windows(topic_ids, n_topic, gen)])
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row: dict[str, Any] = {"step": step, "loss": round(loss.item(), 4), "grad_norm": round(gn, 4),
                               "lr": float(f"{sched.get_last_lr()[0]:.4g}")}
        if step % eval_every == 0 or step == steps:
            row["held_out_loss"] = round(held_loss(), 4)
            log(f"step {step}/{steps}: loss {row['loss']:.3f}, held out {row['held_out_loss']:.3f}, "
                f"{time.perf_counter() - t_train:.0f} s")
        curve.append(row)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()},
              str(out_dir / WEIGHTS))
    model.config.to_json_file(str(out_dir / CONFIG))
    tok.save(str(out_dir / TOKENIZER))
    record = {
        "seed": seed, "steps": steps, "batch": batch, "context": context, "lr": lr, "topic_share": topic_share,
        "vocab_size": tok.get_vocab_size(), "parameters": n_params, "tokens_seen": steps * batch * context,
        "corpus": {"python": python_version(), "digest": digest(code + topics), "code_files": len(code_tr),
                   "topics": len(topic_tr), "held_out_documents": len(held), "code_tokens": len(code_ids),
                   "topic_tokens": len(topic_ids)},
        "uniform_loss": round(math.log(tok.get_vocab_size()), 4),
        "final_held_out_loss": curve[-1]["held_out_loss"],
        "wall_s": round(time.perf_counter() - wall0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
        "data_s": round(t_data, 1), "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
        "torch": torch.__version__, "curve": curve,
    }
    (out_dir / RECORD).write_text(json.dumps(record, separators=(",", ":")) + "\n", encoding="utf-8")
    return record
