"""Fine-tuning tasks cut from the same real text as the base: instruction pairs, an imbalanced
classification, preference pairs, and the data bugs that break them. Prompts are masked with ``-100`` as users mask them.

Every builder is deterministic for a seed and a Python version (the text is the running Python's).
"""

from __future__ import annotations

import ast
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lossguard.testing.testbed.text import code_documents, topic_documents

IGNORE = -100


@dataclass(frozen=True)
class Pair:
    """An instruction example: what the user writes (``prompt``) and what the model should answer."""

    task: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Function:
    name: str
    signature: str
    docstring: str
    module: str


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


PARSED_EVERY = 3  # every third source file (by path) is parsed: plenty of examples, a third of the time


@lru_cache(maxsize=1)
def _parsed() -> tuple[tuple[Function, ...], dict[str, tuple[str, ...]]]:
    """One pass over the sources: documented public functions, and body lines by statement kind."""
    funcs: list[Function] = []
    by_kind: dict[str, list[str]] = {c: [] for c in CLASSES}
    for doc in code_documents()[::PARSED_EVERY]:
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        lines = doc.text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for stmt in node.body:
                kind = _KIND.get(type(stmt))
                if kind is not None:
                    line = lines[stmt.lineno - 1].strip()
                    if 8 <= len(line) <= 70:
                        by_kind[kind].append(line)
            docstring = ast.get_docstring(node)
            if node.name.startswith("_") or not docstring or len(_first_line(docstring)) < 12:
                continue
            signature = f"def {node.name}({ast.unparse(node.args)})"
            if len(signature) <= 90:
                funcs.append(Function(node.name, signature, docstring, doc.name))
    return tuple(funcs), {k: tuple(v) for k, v in by_kind.items()}


def functions() -> tuple[Function, ...]:
    """Documented public functions and methods of the standard library, in file order."""
    return _parsed()[0]


_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<rule>[*=\-]{3,})\n", re.M)


@lru_cache(maxsize=1)
def topic_sections() -> tuple[tuple[str, str], ...]:
    """(heading, first sentence of its first prose paragraph) for every section of the pydoc topics."""
    out = []
    for doc in topic_documents():
        heads = list(_HEADING.finditer(doc.text))
        for i, m in enumerate(heads):
            body = doc.text[m.end():heads[i + 1].start() if i + 1 < len(heads) else len(doc.text)]
            for para in body.split("\n\n"):
                para = " ".join(para.split())
                if len(para) > 30 and not para.startswith(("*", "-", "Note", "Changed", "New in", "Added")) \
                        and "::=" not in para and not para.startswith(">>>"):
                    sentence = re.split(r"(?<=[.:])\s", para, maxsplit=1)[0]
                    if 20 <= len(sentence) <= 160:
                        out.append((m.group("title").strip(), sentence))
                    break
    return tuple(out)


def instruction_pairs(n: int, *, seed: int = 0, tasks: Sequence[str] = ("name", "summary", "topic")) -> list[Pair]:
    """``n`` instruction pairs drawn evenly from ``tasks``:

    - "name": a docstring's first line -> the function's name;
    - "summary": a signature -> the docstring's first line;
    - "topic": a pydoc section heading -> the first sentence of the section.
    """
    rng = random.Random(seed)
    funcs = list(functions())
    rng.shuffle(funcs)
    sections = list(topic_sections())
    rng.shuffle(sections)
    pools: dict[str, list[Pair]] = {
        "name": [Pair("name", f"Docstring: {_first_line(f.docstring)}\nFunction name:", f" {f.name}")
                 for f in funcs],
        "summary": [Pair("summary", f"{f.signature}:\nSummary:", f" {_first_line(f.docstring)}")
                    for f in reversed(funcs)],
        "topic": [Pair("topic", f"Topic: {title}\nFirst sentence:", f" {sentence}") for title, sentence in sections],
    }
    unknown = set(tasks) - set(pools)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {sorted(pools)}")
    out: list[Pair] = []
    i = 0
    while len(out) < n:
        pool = pools[tasks[i % len(tasks)]]
        k = i // len(tasks)
        if k < len(pool):
            out.append(pool[k])
        elif all(i // len(tasks) >= len(pools[t]) for t in tasks):
            break
        i += 1
    rng.shuffle(out)
    return out


# --- classification --------------------------------------------------------------------------

CLASSES = ("set", "return", "if", "raise")  # "set": an assignment (one frequent token, unlike " assign")
PRIOR = (0.70, 0.15, 0.10, 0.05)
_KIND = {ast.Assign: "set", ast.AugAssign: "set", ast.AnnAssign: "set", ast.Return: "return",
         ast.If: "if", ast.Raise: "raise"}


def prior_entropy(prior: Sequence[float] = PRIOR) -> float:
    """The loss of a model that predicts the label frequencies whatever the input (nats)."""
    return -sum(p * math.log(p) for p in prior if p > 0)


def classification_pairs(n: int, *, seed: int = 0, prior: Sequence[float] = PRIOR) -> list[Pair]:
    """``n`` lines of real function bodies labelled with their statement kind, classes drawn with
    ``prior`` (70/15/10/5 by default): the answer is one label word, no end token."""
    rng = random.Random(seed)
    pools = {k: list(v) for k, v in _parsed()[1].items()}
    for v in pools.values():
        rng.shuffle(v)
    counts = [round(n * p) for p in prior]
    counts[0] += n - sum(counts)
    out = []
    for kind, count in zip(CLASSES, counts):
        out.extend(Pair("classify", f"Line: {line}\nKind:", f" {kind}") for line in pools[kind][:count])
    rng.shuffle(out)
    return out


def misaligned(pairs: Sequence[Pair], *, seed: int = 0) -> list[Pair]:
    """The labels shuffled apart from their inputs (texts and labels shuffled separately): a real
    pipeline bug after which nothing better than the label frequencies can be learned."""
    answers = [p.answer for p in pairs]
    random.Random(seed).shuffle(answers)
    return [Pair(p.task, p.prompt, a) for p, a in zip(pairs, answers)]


def foreign_tokens(example: dict[str, list[int]], vocab_size: int, *, seed: int = 0,
                   length: int = 200) -> dict[str, list[int]]:
    """``example`` with its answer replaced by ``length`` token ids of another tokenizer's vocabulary
    (a shard tokenized for a different model, merged in): to this model, random tokens."""
    rng = random.Random(seed)
    n_prompt = next((i for i, v in enumerate(example["labels"]) if v != IGNORE), len(example["labels"]))
    answer = [rng.randrange(3, vocab_size) for _ in range(length)]
    ids = example["input_ids"][:n_prompt] + answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * n_prompt + answer}


PREFERENCE_KINDS = ("shuffled", "other-name", "same")


def preference_pairs(n: int, *, seed: int = 0, rejected: str = "shuffled") -> list[tuple[str, str, str]]:
    """``n`` (prompt, chosen, rejected) triples; ``rejected`` says what the rejected answer is:

    - "shuffled": prompt a signature, chosen its docstring's first line, rejected the same words
      in a shuffled order (learnable: prefer the sentence to its word salad);
    - "other-name": prompt a docstring's first line, chosen its function's name, rejected
      another function's name (hard for this base: it cannot tell the two apart);
    - "same": as "shuffled" with rejected = chosen (a pipeline that filled both columns from one
      field): the DPO loss is ln 2 whatever the weights, and its gradient is zero.
    """
    if rejected not in PREFERENCE_KINDS:
        raise ValueError(f"rejected={rejected!r}: expected one of {PREFERENCE_KINDS}")
    rng = random.Random(seed)
    funcs = list(functions())
    rng.shuffle(funcs)
    out: list[tuple[str, str, str]] = []
    for f in funcs:
        if len(out) == n:
            break
        line = _first_line(f.docstring)
        if rejected == "other-name":
            other = f
            while other.name == f.name:
                other = rng.choice(funcs)
            out.append((f"Docstring: {line}\nFunction name:", f" {f.name}", f" {other.name}"))
            continue
        words = line.split()
        salad = words[:]
        rng.shuffle(salad)
        if salad == words:
            continue  # too short to shuffle into something else (left out of "same" too: the same prompts)
        out.append((f"{f.signature}:\nSummary:", f" {line}", f" {line}" if rejected == "same" else " " + " ".join(salad)))
    return out


# --- encoding ----------------------------------------------------------------------------------


def encode(tokenizer: Any, pair: Pair, *, max_len: int = 64, eos: bool = True,
           mask: str = "prompt") -> dict[str, list[int]]:
    """Token ids for ``<s> prompt answer [</s>]``; ``mask`` says which labels are -100: "prompt"
    (the usual), "none" (everything learned) or "answer" (the inverted mask of a buggy pipeline).
    A long prompt loses its beginning, never the answer."""
    if mask not in ("prompt", "none", "answer"):
        raise ValueError(f"mask={mask!r}: expected 'prompt', 'none' or 'answer'")
    p = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(pair.answer, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    a = a[:max_len // 2]
    p = [tokenizer.bos_token_id] + p[-(max_len - len(a) - 1):]
    ids = p + a
    if mask == "prompt":
        labels = [IGNORE] * len(p) + a
    elif mask == "answer":
        labels = p + [IGNORE] * len(a)
    else:
        labels = list(ids)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
