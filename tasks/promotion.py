"""The one promotion rule: champion vs candidate, evaluated under the same protocol.

The pipeline registers each CAFM generator as the ``candidate``; the pipeline's evaluation
stage and the scheduled evaluation both end here. The candidate becomes ``champion`` when
there is none, or when it is strictly better on the primary metric and no watched metric is
worse than the champion's by more than ``max_regression`` (``cafm_core.evaluation.decide_promotion``).
Both headlines must come from one protocol (the callers evaluate both under it).
"""

from __future__ import annotations

from dataclasses import dataclass

from cafm_core.evaluation import ChampionDecision, decide_promotion
from tasks.tracking import Tracker

__all__ = ["PromotionOutcome", "PromotionRule", "promote"]


HEADLINE_METRICS = {"image": ("fd", ("fd", "class_accuracy")), "points": ("sliced_wasserstein", ("sliced_wasserstein",))}
"""The default primary and watched metrics by kind of data."""


@dataclass(frozen=True)
class PromotionRule:
    """``primary`` / ``watched`` None: the data's headline metrics (:data:`HEADLINE_METRICS`)."""

    primary: str | None = None
    watched: tuple[str, ...] | None = None
    max_regression: float = 0.10

    def for_kind(self, kind: str) -> PromotionRule:
        """The rule with its defaults filled in for ``kind`` (``image`` or ``points``) data."""
        primary, watched = HEADLINE_METRICS[kind]
        return PromotionRule(self.primary or primary, self.watched or watched, self.max_regression)


@dataclass(frozen=True)
class PromotionOutcome:
    champion: str | None  # before the decision
    candidate: str | None
    rule: PromotionRule  # as applied (defaults filled in)
    decision: ChampionDecision | None  # None: nothing to compare (no champion, or one version holds both roles)
    promoted: bool

    def describe(self) -> str:
        rule = self.rule
        if self.candidate is None:
            return "No candidate: nothing to decide."
        if self.decision is None:
            if self.promoted:
                return f"No champion existed: candidate version {self.candidate} became the champion."
            return "One version holds both roles: nothing to compare."
        if self.decision.regressions:
            return f"**Regression**: {self.decision.describe(rule.max_regression)}. Champion kept."
        if self.promoted:
            return (f"Candidate version {self.candidate} is better on {rule.primary} than champion version "
                    f"{self.champion}: **promoted to champion**.")
        return f"Candidate version {self.candidate} is not better on {rule.primary}: champion {self.champion} kept."


def promote(tracker: Tracker, model_name: str, roles: dict[str, str], headlines: dict[str, dict[str, float]],
            rule: PromotionRule, *, kind: str = "image") -> PromotionOutcome:
    """Decide between ``roles["champion"]`` and ``roles["candidate"]`` (versions) from their
    ``headlines`` (version -> metrics, one protocol, ``kind`` of data) and move the
    ``champion`` alias if the candidate wins."""
    rule = rule.for_kind(kind)
    champion, candidate = roles.get("champion"), roles.get("candidate")
    decision, promoted = None, False
    if champion is not None and candidate is not None and champion != candidate:
        decision = decide_promotion(headlines[champion], headlines[candidate], primary=rule.primary,
                                    watched=list(rule.watched), max_regression=rule.max_regression)
        promoted = decision.promote
    elif champion is None and candidate is not None:
        promoted = True  # the first candidate becomes the champion
    if promoted:
        tracker.client.set_registered_model_alias(model_name, "champion", candidate)
    return PromotionOutcome(champion, candidate, rule, decision, promoted)
