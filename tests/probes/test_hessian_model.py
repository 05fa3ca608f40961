"""probe_model on a real tiny LoRA Llama: no side effects, skips with reasons, the two-batch rule."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lossguard.config import ProbeConfig
from lossguard.probes.hessian import CurvatureResult, ProbeSkipped, Verdict, probe_model, split_groups
from lossguard.testing.tiny import PadCollator, add_lora, build_dataset, build_model, build_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems run fastest on one thread, and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def lora_model(tok, *, b_scale: float = 0.2, dropout: float = 0.0):
    model = add_lora(build_model(tok, hidden_size=32, seed=0), r=2, targets=("q_proj", "v_proj"))
    if b_scale:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * b_scale)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = dropout
    return model


def batches(tok, n: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    collate = PadCollator(tok.pad_token_id)
    data = build_dataset(tok, n * size, seed=seed)
    return [collate(data[i * size:(i + 1) * size]) for i in range(n)]


def rng_fingerprint() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(torch.rand(()))


@pytest.mark.parametrize("hvp", ["auto", "finite_difference"])
def test_probe_changes_no_grad_optimizer_mode_rng_or_weights(tok, hvp: str) -> None:
    model = lora_model(tok, dropout=0.3)
    model.train()
    frozen_eval = model.base_model.model.model.layers[0].mlp
    frozen_eval.eval()  # a user's per-module choice the probe must keep
    kept = batches(tok, 2, 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**kept[0]).loss.backward()
    opt.step()
    model(**kept[1]).loss.backward()  # .grad holds a pending gradient
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    modes = {n: m.training for n, m in model.named_modules()}
    for seed in (11, 12, 13):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    res = probe_model(model, kept, config=ProbeConfig(hvp=hvp, max_iter=20), seed=0)

    assert isinstance(res, CurvatureResult), res
    assert res.method == ("double_backward" if hvp == "auto" else "finite_difference")
    assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    after = opt.state_dict()["state"]
    assert after.keys() == opt_state.keys()
    assert all(torch.equal(after[k][n], t) for k, v in opt_state.items() for n, t in v.items())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not frozen_eval.training and model.training
    probed = rng_fingerprint()
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    assert rng_fingerprint() == probed


def test_probe_is_taken_in_eval_mode(tok) -> None:
    """With attention dropout on, eval-mode probing is deterministic and equals a dropout-free model."""
    noisy = lora_model(tok, dropout=0.5).train()
    clean = lora_model(tok, dropout=0.0).eval()
    kept = batches(tok, 1, 8)
    cfg = ProbeConfig(groups=1, max_iter=20)
    a, b = probe_model(noisy, kept, config=cfg, seed=0), probe_model(clean, kept, config=cfg, seed=0)
    assert isinstance(a, CurvatureResult) and isinstance(b, CurvatureResult)
    assert a.lambda_max == pytest.approx(b.lambda_max, rel=1e-5)
    assert a.lambda_min == pytest.approx(b.lambda_min, rel=1e-5, abs=1e-6)


def test_two_batch_rule_probes_each_group(tok) -> None:
    model = lora_model(tok)
    kept = batches(tok, 2, 6)
    res = probe_model(model, kept, config=ProbeConfig(groups=2, max_iter=20), seed=0)
    assert isinstance(res, CurvatureResult)
    assert len(res.groups) == 2 and res.extra["batch_sequences"] == [6, 6]
    assert res.n_hvp == sum(g["n_hvp"] for g in res.groups)
    verdicts = {g["verdict"] for g in res.groups}
    expected = verdicts.pop() if len(verdicts) == 1 else "inconclusive"
    assert res.verdict.value == expected
    assert res.groups[0]["lambda_max"] != res.groups[1]["lambda_max"]
    assert res.to_record(step=40)["groups"][1]["sequences"] == 6


def test_split_groups_by_batches_rows_or_explicit(tok) -> None:
    two = batches(tok, 2, 4)
    assert [len(g) for g in split_groups(two, 2)] == [1, 1]
    one = batches(tok, 1, 8)
    rows = split_groups(one, 2)
    assert [g[0]["labels"].shape[0] for g in rows] == [4, 4]
    assert torch.equal(torch.cat([rows[0][0]["input_ids"], rows[1][0]["input_ids"]]), one[0]["input_ids"])
    assert split_groups([two, one], 2) == [two, one]
    assert len(split_groups(two, 1)) == 1
    assert split_groups([], 2) == []


def test_skips_with_reasons(tok) -> None:
    kept = batches(tok, 1, 4)
    fresh = lora_model(tok, b_scale=0.0)
    zero_b = probe_model(fresh, kept)
    assert isinstance(zero_b, ProbeSkipped) and zero_b.reason == "lora_b_zero"
    assert "lora_B" in zero_b.message
    model = lora_model(tok)
    warm = probe_model(model, kept, step=5, warmup_steps=10)
    assert isinstance(warm, ProbeSkipped) and warm.reason == "warmup"
    assert warm.to_record() == {"kind": "probe", "skipped": True, "reason": "warmup", "message": warm.message, "step": 5}
    off = probe_model(model, kept, config=ProbeConfig(enabled=False))
    assert isinstance(off, ProbeSkipped) and off.reason == "disabled"
    masked = [{**kept[0], "labels": torch.full_like(kept[0]["labels"], -100)}]
    none = probe_model(model, masked, config=ProbeConfig(groups=1))
    assert isinstance(none, ProbeSkipped) and none.reason == "no_labels"
    assert probe_model(model, []).reason == "no_batches"


def test_a_failing_probe_is_reported_not_raised(tok) -> None:
    model = lora_model(tok).train()
    good = batches(tok, 1, 4)[0]
    broken = [{**good, "labels": good["labels"][:, :-2]}]  # labels shorter than the inputs
    res = probe_model(model, broken, config=ProbeConfig(groups=1))
    assert isinstance(res, ProbeSkipped) and res.reason == "error"
    assert res.message.startswith("the probe failed: ")
    assert model.training


def test_saddle_verdict_on_a_real_lora_model_is_consistent_with_its_ratio(tok) -> None:
    res = probe_model(lora_model(tok), batches(tok, 1, 8), config=ProbeConfig(groups=1), seed=0)
    assert isinstance(res, CurvatureResult)
    assert res.lambda_max > 0 and res.residuals[0] <= 0.05 * res.lambda_max
    if res.ratio < -0.05:
        assert res.verdict is Verdict.SADDLE
    assert res.loss is not None and res.loss > 0
