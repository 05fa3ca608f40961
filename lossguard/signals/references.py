"""What a loss can be compared with: the levels a model reaches without learning anything.

A flat training loss alone cannot tell a premature plateau from a run that has converged (a
pretrained model's SFT loss falls fast, then slowly, then sits). What can is how the level
compares with what the data allows:

- the **uniform level**, ln V: a model that predicts every token (or class) alike;
- the **unigram level**: the entropy of the label tokens themselves, what a model that ignores
  the context reaches (the label prior of a classifier: majority-class collapse sits here).

A loss flat near one of them has learned nothing from the inputs; a loss flat far below them
has learned, and its flat stretch is convergence unless something else says otherwise.

The objective matters too: preference and RL losses (DPO, KTO, ORPO, GRPO, PPO, reward models)
are not cross-entropies; read from the trainer's class online and from the log's keys offline.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lossguard.numbers import as_float


class Objective(str, enum.Enum):
    """What the logged loss is."""

    CROSS_ENTROPY = "cross_entropy"  # language modelling, SFT, classification
    PREFERENCE = "preference"  # DPO, KTO, ORPO, CPO, SimPO, IPO, reward models
    RL = "rl"  # GRPO, RLOO, PPO
    UNKNOWN = "unknown"

    @property
    def is_convergence_signal(self) -> bool:
        return self in (Objective.CROSS_ENTROPY, Objective.UNKNOWN)


# trainer class names (TRL and the like) -> objective; matched as substrings of the class name
_TRAINER_OBJECTIVES = (
    (("DPO", "KTO", "ORPO", "CPO", "IPO", "SimPO", "BCO", "Reward", "Preference"), Objective.PREFERENCE),
    (("GRPO", "RLOO", "PPO", "Online", "XPO", "Nash"), Objective.RL),
)
# log keys that only preference and RL trainers write
_PREFERENCE_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                    "logits/chosen", "rewards/accuracies")
_RL_KEYS = ("kl", "reward", "rewards/mean", "objective/kl", "objective/rlhf_reward", "completion_length",
            "completions/mean_length", "ppo/", "env/reward", "episode_reward")


def objective_from_trainer(trainer: Any) -> Objective:
    """The objective a trainer optimises, from its class (and its bases') names."""
    if trainer is None:
        return Objective.UNKNOWN
    names = [cls.__name__ for cls in type(trainer).__mro__]
    for markers, objective in _TRAINER_OBJECTIVES:
        if any(m.lower() in name.lower() for name in names for m in markers):
            return objective
    return Objective.CROSS_ENTROPY if any(name == "Trainer" for name in names) else Objective.UNKNOWN


def objective_from_keys(keys: Iterable[str]) -> Objective:
    """The objective a log's metric keys betray (``rewards/chosen`` is DPO's, ``kl`` an RL run's)."""
    lowered = [str(k).lower() for k in keys]
    if any(k.startswith(p) or k.endswith("/" + p) or k == p for k in lowered for p in _PREFERENCE_KEYS):
        return Objective.PREFERENCE
    for k in lowered:
        base = k.rsplit("/", 1)[-1]
        if any(k == p or k.startswith(p) or base == p for p in _RL_KEYS):
            return Objective.RL
    return Objective.UNKNOWN


def entropy(counts: Mapping[Any, int] | Iterable[int]) -> float | None:
    """Entropy (nats) of the distribution the counts were drawn from, Miller-Madow corrected
    (the plug-in estimate is biased low by about (K - 1) / 2N on a small sample)."""
    values = [int(c) for c in (counts.values() if isinstance(counts, Mapping) else counts) if int(c) > 0]
    n = sum(values)
    if n == 0:
        return None
    h = -sum(c / n * math.log(c / n) for c in values)
    return h + (len(values) - 1) / (2.0 * n)


@dataclass(frozen=True)
class References:
    """The levels a run's loss is judged against; any may be unknown.

    Args:
        uniform: ln V (vocabulary or number of classes): a model predicting all alike.
        unigram: entropy of the label tokens: a model ignoring its inputs.
        objective: what the loss is.
        sources: where each value came from, for the finding's message.
    """

    uniform: float | None = None
    unigram: float | None = None
    objective: Objective = Objective.UNKNOWN
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def levels(self) -> dict[str, float]:
        """The known no-learning levels by name (unigram first: it is the lower, tighter one)."""
        out = {}
        for name in ("unigram", "uniform"):
            v = getattr(self, name)
            if v is not None and math.isfinite(v) and v > 0:
                out[name] = float(v)
        return out

    @property
    def known(self) -> bool:
        return bool(self.levels)

    def nearest(self, loss: float, tolerance: float) -> tuple[str, float] | None:
        """The no-learning level ``loss`` sits at or above (within ``tolerance`` of it,
        relative), lowest first; None when the loss is clearly below all of them."""
        for name, level in sorted(self.levels.items(), key=lambda kv: kv[1]):
            if loss >= level * (1.0 - tolerance):
                return name, level
        return None

    def merged(self, other: References) -> References:
        """These references, with the gaps filled from ``other``."""
        return References(
            uniform=self.uniform if self.uniform is not None else other.uniform,
            unigram=self.unigram if self.unigram is not None else other.unigram,
            objective=self.objective if self.objective is not Objective.UNKNOWN else other.objective,
            sources={**other.sources, **self.sources},
        )

    def to_dict(self) -> dict[str, Any]:
        return {"uniform": self.uniform, "unigram": self.unigram, "objective": self.objective.value,
                "sources": dict(self.sources)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> References:
        if not isinstance(d, Mapping):
            return cls()
        try:
            objective = Objective(d.get("objective", "unknown"))
        except ValueError:
            objective = Objective.UNKNOWN
        sources = d.get("sources")
        return cls(uniform=_level(d.get("uniform")), unigram=_level(d.get("unigram")), objective=objective,
                   sources={str(k): str(v) for k, v in sources.items()} if isinstance(sources, Mapping) else {})


def _level(value: Any) -> float | None:
    v = as_float(value)
    return v if v is not None and math.isfinite(v) and v > 0 else None


def uniform_level(n: int | None) -> float | None:
    """ln n for n >= 2 outcomes (a vocabulary or a label set)."""
    return math.log(n) if n is not None and n >= 2 else None
