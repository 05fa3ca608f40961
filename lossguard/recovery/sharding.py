"""Tensors sharded across ranks (``DTensor``: FSDP2's ``fully_shard``, tensor parallelism).

Under FSDP2 every trainable parameter, its gradient and its optimizer state are ``DTensor``s: each
rank holds one shard (``to_local()``) of a global tensor. A snapshot keeps this rank's shards only
(its memory is the shard's, not the model's), a restore writes them back into the live shards in
place (FSDP2 all-gathers from that very storage), and anything decided from the shards (is every
parameter finite? the gradient norm) is reduced over the ranks first, so that every rank decides
the same. Plain tensors pass through unchanged: without sharding nothing here costs anything.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def _dtensor_type() -> Any:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # an older torch: no DTensor, nothing is sharded
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (one rank's part of a global tensor)."""
    kind = _dtensor_type()
    return kind is not None and isinstance(t, kind)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard (sharing its storage), else ``t`` itself."""
    if is_sharded(t):
        with torch.no_grad():
            return t.to_local()
    return t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t``: a DTensor gathered (a collective when it is sharded or partial: every
    rank must call it), else ``t`` itself. For small tensors, such as a norm."""
    return t.full_tensor() if is_sharded(t) else t


def any_sharded(tensors: Iterable[Any]) -> bool:
    return any(is_sharded(t) for t in tensors)


def fsdp_modules(model: Any) -> list[Any]:
    """The modules ``fully_shard`` (FSDP2) wrapped inside ``model``; none without it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)] if hasattr(model, "modules") else []


def reshard(modules: list[Any]) -> None:
    """Put FSDP2's sharded parameters back on ``modules`` (no collective). A forward without a
    backward (an evaluation, the safety net's scoring) leaves the root module's parameters
    gathered whole; a snapshot or a restore must see, and write, the shards."""
    for m in modules:
        m.reshard()


def all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (every rank gets the same answer); ``flag`` itself
    outside a process group. Every rank must call it at the same point."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def reshard_optimizer_state(optimizer: Any) -> int:
    """After ``optimizer.load_state_dict`` of a snapshot (which holds local shards as plain
    tensors): each sharded parameter's per-element state (Adam's moments, SGD's momentum) becomes
    a DTensor again, laid out like its parameter, as the optimizer made it. Returns how many."""
    kind = _dtensor_type()
    if kind is None:
        return 0
    n = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or not isinstance(p, kind):
                continue
            local = p.to_local()
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, kind) and value.dim() > 0 \
                        and value.shape == local.shape:
                    state[key] = kind.from_local(value, p.device_mesh, p.placements, run_check=False,
                                                 shape=p.shape, stride=p.stride())
                    n += 1
    return n


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads``, some of which may be sharded: each sharded group's local sum
    of squares is all-reduced over the mesh dimensions it is sharded on (one collective per layout,
    not per tensor), replicated ones counted once. A NaN in any rank's shard makes the norm NaN on
    every rank. Every rank must call it with its gradients in the same order."""
    kind = _dtensor_type()
    plain = [g for g in grads if kind is None or not isinstance(g, kind)]
    squares = [torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in plain])) ** 2] \
        if plain else []
    by_layout: dict[tuple[Any, tuple[Any, ...]], list[torch.Tensor]] = {}
    for g in grads:
        if kind is not None and isinstance(g, kind):
            by_layout.setdefault((g.device_mesh, tuple(g.placements)), []).append(g)
    for (mesh, placements), group in by_layout.items():
        if any(p.is_partial() for p in placements):  # pending reductions: only the full tensor has the norm
            full = [g.full_tensor() for g in group]
            squares.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(f.float())
                                                                 for f in full])) ** 2)
            continue
        local = [g.to_local() for g in group]
        sq = torch.stack([torch.linalg.vector_norm(t.float()) ** 2 for t in local]).sum() if local else \
            torch.zeros((), device=mesh.device_type)
        sq = sq.to(torch.float64)
        for dim, placement in enumerate(placements):
            if placement.is_shard():
                torch.distributed.all_reduce(sq, group=mesh.get_group(dim))
        squares.append(sq.to(torch.float32))
    return torch.sqrt(torch.stack([s.float().to(squares[0].device) for s in squares]).sum())
