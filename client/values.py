"""How the CLI writes values it prints in more than one place: metric values and promotion decisions."""

from __future__ import annotations

import math

from aqimodels.api.registry.v1 import registry_pb2 as pb

MISSING = "—"
# Metrics that count things print without decimals.
COUNT_SUFFIXES = ("epochs", "samples", "stations", "rows", "hours", "size", "count", "rounds")
# Metrics that measure (errors, scores, times): their whole values keep the decimals of their kind.
MEASURE_WORDS = ("rmse", "mae", "mse", "r2", "accuracy", "skill", "loss", "latency", "seconds", "throughput",
                  "memory", "ratio", "rate", "margin", "value")


def fmt_metric(name: str, value: float | None) -> str:
    """A metric value for a table cell: accuracy as a percentage, r2 with 3 decimals, errors with 2."""
    if value is None or math.isnan(value):
        return MISSING
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if "accuracy" in name:
        return f"{value * 100:.1f}%"
    if name == "r2":
        return f"{value:.3f}"
    if value == int(value) and (name.endswith(COUNT_SUFFIXES) or not any(w in name for w in MEASURE_WORDS)):
        return f"{int(value):,}"  # counts, epochs, sizes, flags: 6, not 6.00
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.2f}"


def promotion_text(decision: pb.PromotionDecision) -> str:
    """The auto-promotion decision in one line."""
    if not decision.considered:
        return "not considered"
    metric = decision.metric or "rmse"
    cand = fmt_metric(metric, decision.candidate_value)
    if decision.production_version:
        against = f" vs v{decision.production_version} {fmt_metric(metric, decision.production_value)}"
    else:
        against = " (no production version)"
    verdict = "promoted" if decision.promoted else "not promoted"
    reason = f": {decision.reason}" if decision.reason else ""
    return f"{verdict} ({metric} {cand}{against}){reason}"
