"""torch.distributed helpers: every rank must decide from the same numbers."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def barrier() -> None:
    torch.distributed.barrier()


def rank_path(path: Path) -> Path:
    """``path`` for this rank: itself on rank 0, ``<path>-rank<N>`` on the others. Ranks on one
    machine (or a shared filesystem) spilling snapshots into one folder would replace and
    delete each other's files, and a rank that lost one would pick another rollback target."""
    r = rank()
    return path if r == 0 else path.with_name(f"{path.name}-rank{r}")


def snapshot_folder(configured: str | None, log_dir: Path | None) -> Path | None:
    """This rank's snapshot spill folder: ``configured`` (``recovery.snapshot_dir``), else
    ``<log dir>/snapshots``, with the rank suffix; None when neither is set."""
    if configured:
        return rank_path(Path(configured))
    return rank_path(log_dir / "snapshots") if log_dir is not None else None


def device() -> torch.device:
    """Where a collective's buffer must live: the current CUDA device under NCCL, else the CPU."""
    backend = torch.distributed.get_backend()
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_loss_and_sum_tokens(loss: float | None, tokens: int | None) -> tuple[float | None, int | None]:
    """The step loss averaged over ranks and the step's tokens summed over ranks.

    A NaN on any rank makes the mean NaN on every rank, so all ranks see the same non-finite
    step and take the same decision (nobody waits on a collective the others skipped). A rank
    with no loss to report contributes NaN for the same reason.
    """
    if not is_distributed():
        return loss, tokens
    buf = torch.tensor(
        [math.nan if loss is None else loss, 0.0 if tokens is None else float(tokens)],
        dtype=torch.float64,
        device=device(),
    )
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    total_loss, total_tokens = buf.tolist()
    return total_loss / world_size(), (int(total_tokens) if tokens is not None else None)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer); ``flag`` itself when not distributed."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def max_int(value: int) -> int:
    """The largest ``value`` over all ranks (itself when not distributed)."""
    if not is_distributed():
        return value
    buf = torch.tensor([value], dtype=torch.int64, device=device())
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
    return int(buf.item())
