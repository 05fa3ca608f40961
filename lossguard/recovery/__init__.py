"""Recovery: roll back before the trouble, train past it at a reduced LR, restore the LR.

``policy`` (pure, stdlib) decides; ``snapshot`` and ``apply`` (torch, imported where used) act.
"""

from lossguard.recovery.policy import Decision, Phase, RecoveryPolicy, pick_target

__all__ = ["Decision", "Phase", "RecoveryPolicy", "pick_target"]
