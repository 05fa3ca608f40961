"""What a Hessian probe will cost before it runs: its plan in time and its memory (pure functions).

Time: a probe is ``groups x products x micro-batches`` micro-batch Hessian-vector products, each
measured (or estimated from the training step time) before the probe commits to a plan.
``plan_probe`` picks the largest plan that fits the time left: first enough products for Lanczos
to settle (20), then more micro-batches (sequences), then more products up to ``max_iter``.

Memory, beside the model and what training holds:

* the Lanczos basis: one vector of the trainable size per product, 4 bytes a value (2 in
  bfloat16), on the device or on the host;
* working vectors: about ``WORK_VECTORS`` of the trainable size in float32 on the device (the
  current and next Lanczos vectors, the product being summed, a temporary, and for finite
  differences the copy of the weights and the gradient being summed);
* one micro-batch product's graph: measured on CUDA around the first product; before it, the
  attention score matrices that double backward needs on the math backend are estimated by
  ``math_attention_bytes``.

``probe_memory`` is what the preflight cost model prints; ``choose_basis`` places the basis: in
float32 on the device, or not at all (the three-term recurrence: two vectors instead of one per
product, as accurate on the extremes in the exact tests, no Ritz vectors); where Ritz vectors are
needed, on the host or in bfloat16 (0.011% of lambda_max on the exact tests).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

FLOAT32 = 4
BFLOAT16 = 2
WORK_VECTORS = 6
SETTLE_ITER = 20
RECURRENCE_PASSES = 8
REORTH_SHARE = 0.1  # a kept basis whose reorthogonalization costs more of the probe's time gives way
DB_GRAPH_FACTOR = 3.5  # a double backward's graph, in training transients (measured 2.9-3.6)
ATTENTION_COPIES = 8  # score-sized tensors per layer kept for the second backward (measured: 7.8)


class BasisPlace(str, enum.Enum):
    """Where the Lanczos basis lives (``NONE``: not kept, the three-term recurrence)."""

    DEVICE = "device"
    HOST = "host"
    NONE = "none"


@dataclass(frozen=True)
class ProbeMemory:
    """Bytes a probe holds besides the model, split by what they are."""

    n_params: int
    vectors: int
    basis_bytes: int
    basis_place: BasisPlace
    basis_half: bool
    work_bytes: int
    graph_bytes: int | None

    @property
    def device_bytes(self) -> int:
        """On the parameters' device: working vectors, the graph (when known), the basis if there."""
        basis = self.basis_bytes if self.basis_place is BasisPlace.DEVICE else 0
        return basis + self.work_bytes + (self.graph_bytes or 0)

    @property
    def host_bytes(self) -> int:
        return self.basis_bytes if self.basis_place is BasisPlace.HOST else 0

    def summary(self) -> dict[str, Any]:
        return {
            "n_params": self.n_params,
            "vectors": self.vectors,
            "basis_bytes": self.basis_bytes,
            "basis_place": self.basis_place.value,
            "basis_dtype": "bfloat16" if self.basis_half else "float32",
            "work_bytes": self.work_bytes,
            "graph_bytes": self.graph_bytes,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
        }


def probe_memory(n_params: int, *, vectors: int = 30, half: bool = False,
                 place: BasisPlace = BasisPlace.DEVICE, graph_bytes: int | None = None) -> ProbeMemory:
    """The probe's memory for ``n_params`` trainable parameters and a ``vectors``-product basis.

    ``graph_bytes`` is one micro-batch product's graph when measured (CUDA) or estimated; the
    working vectors are float32 (float64 models need twice as much). ``place=NONE`` keeps no
    basis (``vectors`` is then ignored).
    """
    value = BFLOAT16 if half else FLOAT32
    stored = 0 if place is BasisPlace.NONE else vectors
    return ProbeMemory(n_params=n_params, vectors=stored, basis_bytes=stored * n_params * value,
                       basis_place=place, basis_half=half and stored > 0,
                       work_bytes=WORK_VECTORS * n_params * FLOAT32, graph_bytes=graph_bytes)


def math_attention_bytes(*, layers: int, heads: int, rows: int, seq_len: int, value_bytes: int) -> int:
    """Attention score memory of one micro-batch's double-backward graph on the math backend.

    Every layer materialises ``rows x heads x seq_len^2`` scores; the graph of a double backward
    holds about ``ATTENTION_COPIES`` such tensors per layer (7.8 measured on CPU with torch 2.13:
    a Llama of 2 layers and 8 heads on 2 x 1024 tokens, 997 MiB above the forward's memory, where
    a plain gradient on the fused kernel needed 38 MiB). For 4 x 2048 tokens through a 32-layer,
    32-head model in bf16 that is 256 GiB: there the probe takes finite differences on the fused
    kernels.
    """
    return ATTENTION_COPIES * layers * rows * heads * seq_len * seq_len * value_bytes


@dataclass(frozen=True)
class PeakEstimate:
    """Where each product method would take the peak memory (allocated bytes on CUDA), against
    ``limit`` = ``max_memory_ratio`` x training's peak so far."""

    limit: float
    double_backward: float
    finite_difference: float
    message: str

    def summary(self) -> dict[str, Any]:
        return {"limit": round(self.limit), "double_backward": round(self.double_backward),
                "finite_difference": round(self.finite_difference)}

    @property
    def avoid_double_backward(self) -> bool:
        """Double backward would break the limit and finite differences stay lower."""
        return self.double_backward > self.limit and self.finite_difference < self.double_backward

    def basis_fits(self, basis_bytes: int, method: str) -> bool:
        """Whether a kept basis of ``basis_bytes`` keeps ``method``'s peak within the limit."""
        peak = self.double_backward if method == "double_backward" else self.finite_difference
        return peak + basis_bytes <= self.limit


def estimate_peaks(*, now: int, peak: int, n_params: int, ratio: float) -> PeakEstimate:
    """The probe's peak memory by method, from what training holds (``now``) and its peak so far.

    Training's transient (``peak - now``: a micro-batch's activations and gradients) is what one
    product repeats: finite differences take plain gradients, so about one transient plus the
    weights' copy; a double backward keeps the graph of a gradient, measured at
    ``DB_GRAPH_FACTOR`` transients (2.9x for a LoRA adapter and 3.6x for a full fine-tune of a 26M
    Llama on CPU, 4 x 64 tokens). Both add the working vectors.
    """
    transient = max(peak - now, 0)
    work = WORK_VECTORS * n_params * FLOAT32
    db = now + DB_GRAPH_FACTOR * transient + work
    fd = now + transient + work + n_params * FLOAT32
    limit = ratio * peak
    message = (f"double backward would take the peak to about {_gb(db)} and finite differences to {_gb(fd)}, "
               f"against {ratio:g} x training's peak {_gb(peak)} = {_gb(limit)}")
    return PeakEstimate(limit, db, fd, message)


@dataclass(frozen=True)
class BasisChoice:
    """Where the basis goes and in what precision; ``fits`` false: not even without a basis."""

    fits: bool
    memory: ProbeMemory
    message: str

    @property
    def keep(self) -> bool:
        """Whether a basis is stored (otherwise the three-term recurrence runs)."""
        return self.memory.basis_place is not BasisPlace.NONE


def choose_basis(n_params: int, *, vectors: int, device_free: int | None, host_free: int | None,
                 accelerator: bool, graph_bytes: int | None = None, fraction: float = 0.5,
                 need_vectors: bool = False, prefer_recurrence: str | None = None) -> BasisChoice:
    """Where a ``vectors``-product Lanczos basis goes, using at most ``fraction`` of the free memory.

    A float32 basis on the device when it fits (and no ``prefer_recurrence`` reason is given); otherwise
    no stored basis, the three-term recurrence (as accurate at both ends on the exact tests, two
    vectors instead of one per product, no reorthogonalization work). When the caller needs Ritz
    vectors (``need_vectors``) a basis must be kept: float32 on the device, then (with an
    accelerator) float32 on the host, then bfloat16 there (0.011% of lambda_max on the exact
    tests), else it does not fit. A free amount of ``None`` is unknown and taken as enough. On a
    CPU the device is the host (``device_free`` is then ignored).
    """

    def room(free: int | None) -> float:
        return math.inf if free is None else fraction * free

    dev_room = room(device_free if accelerator else host_free)
    host_room = room(host_free) if accelerator else dev_room
    fixed = probe_memory(n_params, vectors=0, graph_bytes=graph_bytes).device_bytes
    none = probe_memory(n_params, place=BasisPlace.NONE, graph_bytes=graph_bytes)
    if fixed > dev_room:
        return BasisChoice(False, none, (
            f"the probe's working vectors and graph need {_gb(fixed)} on the device and "
            f"{fraction:.0%} of its free memory is {_gb(dev_room)}"))
    full = probe_memory(n_params, vectors=vectors, graph_bytes=graph_bytes)
    fits_device = full.basis_bytes <= dev_room - fixed
    if not need_vectors:
        if fits_device and not prefer_recurrence:
            return BasisChoice(True, full, _where(full))
        why = prefer_recurrence if fits_device else (
            f"{_where(full)} does not fit in what is left of {fraction:.0%} of the free memory "
            f"({_gb(max(dev_room - fixed, 0.0))})")
        return BasisChoice(True, none, f"no stored basis (the three-term recurrence): {why}")
    off = BasisPlace.HOST if accelerator else BasisPlace.DEVICE
    options = [(BasisPlace.DEVICE, False)] + ([(BasisPlace.HOST, False)] if accelerator else []) + [(off, True)]
    for place, half in options:
        mem = probe_memory(n_params, vectors=vectors, half=half, place=place, graph_bytes=graph_bytes)
        left = dev_room - fixed if place is BasisPlace.DEVICE else host_room
        if mem.basis_bytes <= left:
            return BasisChoice(True, mem, _where(mem))
    half_bytes = vectors * n_params * BFLOAT16
    left = max(host_room if accelerator else dev_room - fixed, 0.0)
    mem = probe_memory(n_params, vectors=vectors, half=True, place=off, graph_bytes=graph_bytes)
    return BasisChoice(False, mem, (
        f"the Lanczos basis needs {vectors} x {n_params:,} values ({_gb(half_bytes)} in bfloat16) and what is "
        f"left of {fraction:.0%} of the free {'host ' if accelerator else ''}memory is {_gb(left)}"))


def _where(mem: ProbeMemory) -> str:
    dtype = "bfloat16" if mem.basis_half else "float32"
    return f"basis of {mem.vectors} vectors in {dtype} on the {mem.basis_place.value} ({_gb(mem.basis_bytes)})"


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class ProbePlan:
    """How much a probe does: per group ``products`` Lanczos steps over ``micro_batches``."""

    fits: bool
    groups: int
    micro_batches: int
    products: int
    product_seconds: float
    seconds: float
    budget_seconds: float
    message: str

    def summary(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "micro_batches": self.micro_batches,
            "products": self.products,
            "product_seconds": round(self.product_seconds, 4),
            "predicted_seconds": round(self.seconds, 3),
            "budget_seconds": round(self.budget_seconds, 3),
        }


def solver_seconds(products: int, pass_s: float, *, keep_basis: bool = True) -> float:
    """Seconds Lanczos spends besides the products (``pass_s``: one pass over a trainable-sized
    vector). With a kept basis, step ``j`` reorthogonalizes against ``j`` vectors twice, four
    passes over each; the three-term recurrence makes ``RECURRENCE_PASSES`` passes a step."""
    if keep_basis:
        return 2.0 * products * (products + 1) * pass_s
    return RECURRENCE_PASSES * products * pass_s


def plan_probe(*, budget_s: float, product_s: float, micro_batches: int, groups: int, max_iter: int,
               min_iter: int, settle_iter: int = SETTLE_ITER, pass_s: float = 0.0,
               single_s: float | None = None, keep_basis: bool = True) -> ProbePlan:
    """The largest probe that fits ``budget_s``, given ``product_s`` seconds per micro-batch product.

    Per group (each gets ``budget_s / groups``): at least ``min_iter`` products on one
    micro-batch, else it does not fit; then products up to ``settle_iter`` (Lanczos needs about
    20 to settle both ends), then micro-batches up to ``micro_batches``, then products up to
    ``max_iter``. ``pass_s`` prices the solver's own work (``solver_seconds``, with or without a
    kept basis), which matters for full fine-tunes, where reorthogonalizing a kept basis can take
    a large share of the probe (docs/benchmarks.md). ``single_s``, when given, is a
    product's cost on a single micro-batch whose double-backward graph is kept between products
    (only the second backward runs).
    """
    share = budget_s / groups
    per = max(product_s, 1e-9)
    target = min(max_iter, max(settle_iter, min_iter))

    def cost(m: int, p: int) -> float:
        per_product = single_s if m == 1 and single_s is not None else m * product_s
        return p * per_product + solver_seconds(p, pass_s, keep_basis=keep_basis)

    def most_products(m: int) -> int:
        p = max_iter
        while p > 0 and cost(m, p) > share:
            p -= 1
        return p

    def plan(m: int, p: int, fits: bool, message: str) -> ProbePlan:
        return ProbePlan(fits, groups, m, p, product_s, groups * cost(m, p), budget_s, message)

    if cost(1, min_iter) > share:
        one = product_s if single_s is None else single_s
        return plan(1, min_iter, False, (
            f"one Hessian-vector product on one micro-batch takes {one:.3g} s; the smallest probe "
            f"({groups} group{'s' if groups > 1 else ''} x {min_iter} products x 1 micro-batch) needs "
            f"{groups * cost(1, min_iter):.3g} s and {max(budget_s, 0.0):.3g} s of the budget are left"))
    if cost(1, target) > share:
        p = most_products(1)
        return plan(1, p, True, f"{p} products per group on one micro-batch")
    m = max(1, min(micro_batches, int((share - solver_seconds(target, pass_s, keep_basis=keep_basis)) // (target * per))))
    p = most_products(m)
    return plan(m, p, True, f"{p} products per group on {m} micro-batch{'es' if m > 1 else ''}")
