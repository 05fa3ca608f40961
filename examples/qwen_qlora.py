"""QLoRA instruction tuning of Qwen2.5-1.5B-Instruct with lossguard watching the loss.

The set-up from the user's notes: the base model in 4-bit (NF4), LoRA adapters on every linear
layer of the Qwen2 blocks, prompts masked with -100 so only the answers are learned, and the
``TrainingArguments`` from the notes (effective batch 2 x 8 = 16, 3 epochs, lr 2e-4, fp16,
loss printed every 20 steps, a checkpoint every 200 steps).

Needs a CUDA GPU, ``bitsandbytes`` and the model download (about 3 GB)::

    python examples/qwen_qlora.py                      # the built-in toy instructions
    python examples/qwen_qlora.py --data my_data.jsonl # Alpaca-style rows: instruction, input, output
    python examples/qwen_qlora.py --bf16               # Ampere or newer: bf16 instead of fp16
    python examples/qwen_qlora.py --preflight-only     # print lossguard's preflight table and stop

On several GPUs launch one process per GPU (data parallelism), not ``device_map="auto"``::

    torchrun --nproc_per_node=2 examples/qwen_qlora.py

The formatting and masking functions at the top import nothing heavy, so they run (and are
tested) on CPU with any tokenizer, including one without a chat template.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

MODEL_ID = "Qwen/Qwen2.5-1.5B-Instruct"
OUTPUT_DIR = "./qwen-qlora-it"
IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and so the Trainer) skips
QWEN2_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TOY_INSTRUCTIONS = [
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of France?", "Paris."),
    ("Translate 'good morning' into Spanish.", "Buenos días."),
    ("Give the plural of 'mouse'.", "Mice."),
    ("What is 12 times 12?", "144."),
    ("Name the largest planet in the solar system.", "Jupiter."),
    ("Write the opposite of 'ancient'.", "Modern."),
    ("Which gas do plants absorb for photosynthesis?", "Carbon dioxide (CO2)."),
    ("Convert 100 degrees Celsius to Fahrenheit.", "212 degrees Fahrenheit."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen."),
    ("Spell 'necessary' backwards.", "yrassecen"),
    ("What is the chemical symbol for gold?", "Au."),
    ("Summarize in three words: the cat slept all afternoon in the sun.", "Cat sunbathed lazily."),
    ("How many sides does a hexagon have?", "Six."),
    ("What language is spoken in Brazil?", "Portuguese."),
    ("Complete the sequence: 2, 4, 8, 16, ...", "32."),
]


def fallback_prompt(instruction: str) -> str:
    """The plain prompt used when the tokenizer has no chat template."""
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def format_example(tokenizer: Any, instruction: str, response: str, system: str | None = None) -> tuple[str, str]:
    """Split one conversation into (prompt text, response text).

    With a chat template, the prompt is the conversation up to and including the assistant's
    header (``add_generation_prompt=True``) and the response is everything the full rendered
    conversation adds after it (the answer and the end-of-turn marker). Without a template, a
    plain "### Instruction / ### Response" layout is used.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction}
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently inside the full conversation; "
                             "cannot find where the response starts")
        return prompt, full[len(prompt):]
    return fallback_prompt(instruction), response


def mask_prompt(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int) -> dict[str, list[int]] | None:
    """Concatenate prompt and response; label the prompt -100 so only the response is learned.

    The model still sees the prompt (it is in ``input_ids``), but the loss ignores every
    position whose label is -100, so no gradient asks the model to predict the prompt. When the
    sequence is too long the response is cut, never the prompt; when not even one response token
    fits, the example has nothing to learn (its loss would be 0, or NaN for a batch of such rows)
    and ``None`` is returned so the caller drops it.
    """
    room = max_length - len(prompt_ids)
    if room <= 0 or not response_ids:
        return None
    kept_response = list(response_ids[:room])
    input_ids = list(prompt_ids) + kept_response
    labels = [IGNORE_INDEX] * len(prompt_ids) + kept_response
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_example(
    tokenizer: Any, instruction: str, response: str, *, system: str | None = None, max_length: int = 1024
) -> dict[str, list[int]] | None:
    """One training row (input_ids, attention_mask, labels) with the prompt masked, or None."""
    prompt_text, response_text = format_example(tokenizer, instruction, response, system)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    response_ids = list(tokenizer(response_text, add_special_tokens=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        # the chat template closes the turn itself; the plain layout needs explicit BOS/EOS
        if tokenizer.bos_token_id is not None:
            prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
        if tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]
    return mask_prompt(prompt_ids, response_ids, max_length)


def build_dataset(
    tokenizer: Any, pairs: Iterable[tuple[str, str]], *, max_length: int = 1024
) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenized rows for ``(instruction, response)`` pairs, and how many were dropped as too long."""
    rows, dropped = [], 0
    for instruction, response in pairs:
        row = tokenize_example(tokenizer, instruction, response, max_length=max_length)
        if row is None:
            dropped += 1
        else:
            rows.append(row)
    return rows, dropped


def read_jsonl(path: str) -> list[tuple[str, str]]:
    """(instruction, response) pairs from Alpaca-style JSONL (instruction, input, output)."""
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            instruction = row.get("instruction") or row.get("prompt") or ""
            if row.get("input"):
                instruction = f"{instruction}\n\n{row['input']}"
            response = row.get("output") or row.get("response") or row.get("completion") or ""
            pairs.append((instruction, response))
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="Alpaca-style JSONL (instruction, input, output); default: toy data")
    parser.add_argument("--bf16", action="store_true", help="bf16 instead of fp16 (Ampere or newer GPUs)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--preflight-only", action="store_true", help="print the preflight table and exit")
    opts = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from lossguard import LossGuard

    compute_dtype = torch.bfloat16 if opts.bf16 else torch.float16
    tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # One full copy of the model per process: under torchrun each process takes its own GPU.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_ID,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        ),
        dtype=compute_dtype,
        device_map={"": local_rank},
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=QWEN2_LORA_TARGETS,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    model.print_trainable_parameters()

    pairs = read_jsonl(opts.data) if opts.data else TOY_INSTRUCTIONS
    train, dropped = build_dataset(tokenizer, pairs, max_length=opts.max_length)
    if dropped:
        print(f"dropped {dropped} of {len(pairs)} examples whose prompt alone fills max_length={opts.max_length}")

    args = TrainingArguments(
        output_dir=OUTPUT_DIR,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        num_train_epochs=3,
        learning_rate=2e-4,
        fp16=not opts.bf16,
        bf16=opts.bf16,
        logging_steps=20,
        save_steps=200,
        report_to="none",
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    if opts.preflight_only:
        from rich.console import Console

        from lossguard.preflight import preflight
        from lossguard.presentation.preflight_table import preflight_table

        Console().print(preflight_table(preflight(args, model, train, data_collator=collator)))
        return 0

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[LossGuard()],
    )
    trainer.train()
    trainer.save_model(OUTPUT_DIR)  # the final adapter: adapter_config.json + adapter_model.safetensors
    print(f"done; inspect the checkpoints with: lossguard inspect {OUTPUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
