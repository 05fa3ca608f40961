"""The committed testbed base: loads fast, is the model its record describes, has learned its text."""

from __future__ import annotations

import math
import time

import pytest

from lossguard.testing.testbed import base as testbed_base
from lossguard.testing.testbed.text import topic_documents


def test_base_loads_in_under_a_second_of_cpu(one_torch_thread):
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports are not the load)

    testbed_base._read.cache_clear()
    t0 = time.process_time()  # CPU time: the machine's other load does not count against it
    b = testbed_base.load_base()
    took = time.process_time() - t0
    assert took < 1.0, f"loading the testbed base took {took:.2f} s of CPU"
    n = sum(p.numel() for p in b.model.parameters())
    assert n == b.record["parameters"]
    assert 1_000_000 <= n <= 5_000_000
    assert b.model.training and next(b.model.parameters()).dtype.is_floating_point
    assert len(b.tokenizer) == b.record["vocab_size"]


def test_each_load_is_a_fresh_model(one_torch_thread):
    a, b = testbed_base.load_base(), testbed_base.load_base()
    pa, pb = next(a.model.parameters()), next(b.model.parameters())
    with __import__("torch").no_grad():
        pa.add_(1.0)
    assert not bool((pa == pb).all())


def test_base_has_learned_english_text(one_torch_thread):
    """Far below the uniform loss ln V on pydoc prose (the held-out share of pretraining is the
    record's figure; this is text seen in training, so the bound is loose and ISA-proof)."""
    import torch

    b = testbed_base.load_base()
    text = topic_documents()[0].text[:2000]
    ids = torch.tensor([b.tokenizer(text)["input_ids"][:128]])
    with torch.no_grad():
        loss = float(b.model(input_ids=ids, labels=ids).loss)
    uniform = math.log(len(b.tokenizer))
    assert loss < uniform - 2.0, (loss, uniform)
    assert b.record["final_held_out_loss"] < uniform - 2.0


def test_missing_assets_say_how_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain_base.py"):
        testbed_base.load_base(tmp_path)
