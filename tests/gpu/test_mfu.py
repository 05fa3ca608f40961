"""MFU: FLOPs per token for full and LoRA fine-tuning, peak lookup by GPU name, the override."""

from __future__ import annotations

import pytest

from lossguard.gpu.mfu import estimate_mfu, flops_per_token, peak_tflops


def test_flops_per_token_full_and_lora() -> None:
    assert flops_per_token(1_000_000) == 6_000_000
    assert flops_per_token(1_000_000, 1_000_000) == 6_000_000
    # frozen base: forward 2N + activation grads 2N + weight grads 2 N_trainable
    assert flops_per_token(1_000_000, 10_000) == 4_020_000
    assert flops_per_token(1_000_000, 0) == 4_000_000
    assert flops_per_token(1_000_000, recompute=True) == 8_000_000
    with pytest.raises(ValueError, match="trainable_params=2"):
        flops_per_token(1, 2)


def test_lora_on_a_real_peft_model_counts_far_less_than_6n() -> None:
    from lossguard.testing.tiny import add_lora, build_model, build_tokenizer

    model = add_lora(build_model(build_tokenizer()))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < total
    ratio = flops_per_token(total, trainable) / (6 * total)
    assert ratio == pytest.approx((4 * total + 2 * trainable) / (6 * total))
    assert 0.66 < ratio < 0.75


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("Tesla T4", 65.0),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("NVIDIA RTX A6000", 155.0),
        ("Some Future GPU", None),
        (None, None),
    ],
)
def test_peak_by_name(name: str | None, peak: float | None) -> None:
    assert peak_tflops(name) == peak


def test_override_wins_and_is_validated() -> None:
    assert peak_tflops("Some Future GPU", 500.0) == 500.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", 400.0) == 400.0
    with pytest.raises(ValueError, match="peak_tflops=0"):
        peak_tflops("x", 0)


def test_estimate_mfu_numbers() -> None:
    # 7e9 parameters full fine-tune, 4096 tokens/s on one H100: 6*7e9*4096 = 172 TFLOP/s = 17.4%
    est = estimate_mfu(4096, 1.0, 7_000_000_000, gpu_name="NVIDIA H100 80GB HBM3")
    assert est is not None
    assert est.achieved_tflops == pytest.approx(172.032)
    assert est.mfu == pytest.approx(172.032 / 989.0)
    lora = estimate_mfu(8192, 1.0, 7_000_000_000, 40_000_000, gpu_name="NVIDIA H100 80GB HBM3", n_gpus=2)
    assert lora is not None and lora.mfu == pytest.approx((4 * 7e9 + 2 * 4e7) * 4096 / 1e12 / 989.0)
    assert estimate_mfu(4096, 1.0, 7_000_000_000, gpu_name="Unknown") is None
    assert estimate_mfu(0, 1.0, 10, gpu_name="NVIDIA L4") is None
    assert estimate_mfu(10, 0.0, 10, gpu_name="NVIDIA L4") is None
