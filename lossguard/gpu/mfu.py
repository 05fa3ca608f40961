"""Model FLOPs utilization: the share of the GPUs' peak arithmetic that training turns into work.

Unlike NVML utilization (the share of time any kernel ran), MFU says how much of the hardware's
capacity the step used: a fine-tune at 95% "utilization" and 8% MFU is launch- or memory-bound.

FLOPs per trained token, counting each multiply-add as 2 FLOPs and ignoring attention's
sequence-length term (small for short contexts):
- forward: 2 N (N = all parameters the token passes through, adapters included);
- backward, gradients w.r.t. activations: 2 N (needed through frozen layers too);
- backward, gradients w.r.t. weights: 2 N_trainable (only for what is trained).
So 6 N for full fine-tuning and about 4 N + 2 N_trainable for LoRA or other frozen-base
methods. Gradient checkpointing recomputes the forward: + 2 N, not counted as useful work by the
usual MFU definition, so it is off by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Dense (no sparsity) BF16/FP16 tensor-core peaks per GPU in TFLOP/s, from NVIDIA datasheets.
# Most specific pattern first: "H100 PCIe" before "H100".
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGB200\b|\bB200\b", 2250.0),
    (r"\bB100\b", 1750.0),
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b|\bH800\b", 989.0),
    (r"\bA100\b|\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10G\b", 70.0),
    (r"\bA10\b", 125.0),
    (r"\bRTX 6000 Ada\b", 364.0),
    (r"\bRTX A6000\b|\bA6000\b", 155.0),
    (r"\bRTX 4090\b", 165.0),
    (r"\bRTX 3090\b", 71.0),
    (r"\bV100\b", 125.0),
    (r"\bT4\b", 65.0),
)


def peak_tflops(gpu_name: str | None, override: float | None = None) -> float | None:
    """The GPU's dense BF16 peak in TFLOP/s: ``override`` if given, else from its name, else None."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"peak_tflops={override!r} must be > 0")
        return float(override)
    if not gpu_name:
        return None
    for pattern, value in PEAK_TFLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return value
    return None


def flops_per_token(total_params: int, trainable_params: int | None = None, *, recompute: bool = False) -> float:
    """Training FLOPs per token: 4 N + 2 N_trainable (6 N when everything trains).

    Args:
        total_params: parameters a token passes through (base plus adapters).
        trainable_params: parameters that receive gradients; None means all of them.
        recompute: add the forward that activation checkpointing recomputes (hardware FLOPs).
    """
    if total_params < 0:
        raise ValueError(f"total_params={total_params!r} must be >= 0")
    trainable = total_params if trainable_params is None else trainable_params
    if not 0 <= trainable <= total_params:
        raise ValueError(f"trainable_params={trainable_params!r} must be in [0, total_params={total_params}]")
    return 4.0 * total_params + 2.0 * trainable + (2.0 * total_params if recompute else 0.0)


@dataclass(frozen=True)
class MfuEstimate:
    """Achieved vs peak arithmetic for one step (or an average over steps)."""

    mfu: float
    achieved_tflops: float
    peak_tflops: float
    flops_per_token: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def estimate_mfu(
    tokens: int,
    step_time_s: float,
    total_params: int,
    trainable_params: int | None = None,
    *,
    gpu_name: str | None = None,
    n_gpus: int = 1,
    peak_override: float | None = None,
    recompute: bool = False,
) -> MfuEstimate | None:
    """MFU of a step that trained ``tokens`` tokens (summed over ``n_gpus``) in ``step_time_s``.

    Returns None when the peak is unknown (unlisted GPU and no override) or the inputs cannot
    give a rate (no tokens, zero time).
    """
    peak = peak_tflops(gpu_name, peak_override)
    if peak is None or tokens <= 0 or not step_time_s > 0 or n_gpus < 1:
        return None
    fpt = flops_per_token(total_params, trainable_params, recompute=recompute)
    rate = tokens / step_time_s
    achieved = fpt * rate / 1e12 / n_gpus
    return MfuEstimate(
        mfu=achieved / peak,
        achieved_tflops=achieved,
        peak_tflops=peak,
        flops_per_token=fpt,
        tokens_per_s=rate,
    )
