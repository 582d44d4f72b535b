"""Like-for-like decisions: which versions were evaluated on the same data, and when a version may
replace production. Domain code only (versions in, verdicts out); jobs and service call it.

Every version trained by this worker carries its evaluation context as tags (written by the
worker, ``aqimodels.training.runner.evaluation_context``): ``eval.dataset``,
``eval.data_fingerprint``, ``eval.stations``, ``eval.target``, ``eval.test_start``/``_end`` and
``eval.test_key``, the SHA-256 of exactly the rows it was scored on. Two versions are comparable
when their test keys are equal. Versions registered by older workers have no key; they are comparable
among themselves only (what the registry did before, for registries that hold nothing else).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from aqimodels.server.domain import ModelVersion, is_better

TEST_KEY_TAG = "eval.test_key"
DATASET_TAG = "eval.dataset"
STATIONS_TAG = "eval.stations"
TARGET_TAG = "eval.target"
CHAMPION_VERSION_TAG = "champion.version"
CHAMPION_PREFIX = "champion_"
"""The worker's scores of the production model on a challenger's own test rows (run metrics)."""

TARGETS = ("", "pm25", "pm10", "no2", "o3")
"""Target pollutants a retrain may ask for ("" is pm25); the worker has their AQI breakpoints."""

LINEAGE_TAGS = {
    "dataset": DATASET_TAG, "data_fingerprint": "eval.data_fingerprint", "stations": STATIONS_TAG,
    "target": TARGET_TAG, "test_start": "eval.test_start", "test_end": "eval.test_end", "test_key": TEST_KEY_TAG,
    "code_version": "code.version", "git_commit": "code.git_commit", "members": "ensemble.members",
}
"""Lineage field -> version tag (``show`` and GetModelVersion)."""


def test_key(v: ModelVersion) -> str:
    return v.tags.get(TEST_KEY_TAG, "")


def dataset_label(v: ModelVersion) -> str:
    """What a version was evaluated on, for people: ``<dataset> [<test start>..<end>]``."""
    ds = v.tags.get(DATASET_TAG)
    if not ds:
        return v.tags.get("dataset", "") or "unknown (before evaluation tags)"
    start, end = v.tags.get("eval.test_start", "")[:13], v.tags.get("eval.test_end", "")[:13]
    target = v.tags.get(TARGET_TAG, "pm25")
    return f"{ds} test {start}..{end}" + ("" if target == "pm25" else f" target {target}")


def comparable_with(reference: ModelVersion, versions: Iterable[ModelVersion]) -> set[int]:
    """Version numbers evaluated on the same rows as ``reference`` (itself included)."""
    key = test_key(reference)
    return {v.version for v in versions if test_key(v) == key}


def reference_version(versions: list[ModelVersion], production: ModelVersion | None) -> ModelVersion | None:
    """The version whose test data a comparison ranks on: production when compared, else the newest."""
    if production is not None and any(v.version == production.version for v in versions):
        return production
    return max(versions, key=lambda v: v.version) if versions else None


def data_change(candidate: ModelVersion, production: ModelVersion) -> str:
    """How the candidate's station set or target differs from production's ("" when neither does).

    Production's own tags say; for a production version registered before them, the worker's
    reading of the production model (``champion.stations``/``champion.target`` on the candidate)."""
    out = []
    cs, ps = candidate.tags.get(STATIONS_TAG), production.tags.get(STATIONS_TAG)
    if ps is None and candidate.tags.get(CHAMPION_VERSION_TAG) == str(production.version):
        ps = candidate.tags.get("champion.stations")
        if ps is not None and cs is not None:
            cs = ",".join(sorted(cs.split(",")))
    if TARGET_TAG not in production.tags and "champion.target" in candidate.tags and \
            candidate.tags.get(CHAMPION_VERSION_TAG) == str(production.version):
        production = replace(production, tags={**production.tags, TARGET_TAG: candidate.tags["champion.target"]})
    if cs is not None and ps is not None and cs != ps:
        c, p = set(cs.split(",")), set(ps.split(","))
        parts = []
        if p - c:
            parts.append(f"lacks {', '.join(sorted(p - c))}")
        if c - p:
            parts.append(f"adds {', '.join(sorted(c - p))}")
        out.append(f"station set differs ({'; '.join(parts)})")
    ct, pt = candidate.tags.get(TARGET_TAG, "pm25"), production.tags.get(TARGET_TAG, "pm25")
    if (TARGET_TAG in candidate.tags or TARGET_TAG in production.tags) and ct != pt:
        out.append(f"target differs ({ct} instead of {pt})")
    return "; ".join(out)


def data_change_message(name: str, candidate: ModelVersion, production: ModelVersion, change: str) -> str:
    return (f"version {candidate.version} of {name!r} was trained on other data than production v{production.version}: "
            f"{change} ({dataset_label(candidate)} against {dataset_label(production)}); it replaces production "
            "only when asked explicitly (allow_data_change)")


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    reason: str
    candidate_value: float
    production_value: float
    on_data: str  # which rows both numbers come from


def decide(name: str, candidate: ModelVersion, production: ModelVersion | None, metric: str, margin: float,
           allow_data_change: bool = False) -> Verdict:
    """Champion/challenger on the same rows.

    Same test rows: the two logged values. Otherwise the production model's score on the
    candidate's test rows, which the worker computed during the candidate's training
    (``champion_<metric>`` run metrics, ``champion.version`` tag); without that score (or
    scored against another production version) nothing is promoted. A different station set or
    target is never promoted unless ``allow_data_change``."""
    value = candidate.metrics.get(metric, math.nan)
    on = dataset_label(candidate)
    if math.isnan(value):
        return Verdict(False, f"version {candidate.version} has no {metric} metric", value, math.nan, on)
    if production is None:
        return Verdict(True, "no version was in production", value, math.nan, on)
    change = data_change(candidate, production)
    if change and not allow_data_change:
        return Verdict(False, data_change_message(name, candidate, production, change), value,
                       production.metrics.get(metric, math.nan), on)
    scored = candidate.tags.get(CHAMPION_VERSION_TAG) == str(production.version) and \
        f"{CHAMPION_PREFIX}{metric}" in candidate.metrics
    if test_key(candidate) and test_key(candidate) == test_key(production):
        reference = production.metrics.get(metric, math.nan)
        basis = f"production v{production.version}"
    elif scored:
        reference = candidate.metrics[f"{CHAMPION_PREFIX}{metric}"]
        basis = f"production v{production.version} scored on the same rows"
    elif change:  # allowed explicitly: nothing to compare on the same rows
        return Verdict(True, f"data change allowed explicitly: {change}; production v{production.version} "
                             f"cannot be scored on the new data", value, math.nan, on)
    elif not test_key(production):
        reference = production.metrics.get(metric, math.nan)
        basis = (f"production v{production.version} (registered before evaluation tags and not scorable "
                 "here: its logged value)")
    else:
        return Verdict(False, f"production v{production.version} was evaluated on other data "
                              f"({dataset_label(production)}) and was not scored on this version's test rows; "
                              "the numbers are not comparable", value, production.metrics.get(metric, math.nan), on)
    if is_better(metric, value, reference, margin):
        return Verdict(True, f"{metric} {value:.4g} beats {basis} ({reference:.4g}) by the required margin "
                             f"{margin:.1%} on {on}", value, reference, on)
    return Verdict(False, f"{metric} {value:.4g} does not beat {basis} ({reference:.4g}) by the required margin "
                          f"{margin:.1%} on {on}", value, reference, on)


def champion_uri(service: Any, name: str) -> str:
    """``models:/<name>/<production version>`` for the worker to score, "" when there is none."""
    try:
        production = service.snapshot(name, fresh=True).alias("production")
    except Exception:  # noqa: BLE001 - not registered yet: no champion
        return ""
    return f"models:/{name}/{production.version}" if production is not None else ""


def check_members(service: Any, members: list[Any], fingerprint: str, dataset: str) -> None:
    """Refuses (INVALID_ARGUMENT) ensemble members trained on other data than ``fingerprint``, naming them."""
    from aqimodels.client.errors import InvalidArgumentError

    other = []
    for m in members:
        try:
            tags = service.snapshot(m.model_name, fresh=True).version(m.version).tags
        except Exception:  # noqa: BLE001 - gone meanwhile: the worker reports it
            tags = {}
        trained_on = tags.get("eval.data_fingerprint", "")
        if trained_on and trained_on != fingerprint:
            other.append(f"{m.model_name} v{m.version} ({tags.get(DATASET_TAG, '?')})")
    if other:
        raise InvalidArgumentError(
            f"ensemble member(s) {', '.join(other)} were trained and evaluated on other data than {dataset}; "
            "retrain them in the same request (e.g. `retrain xgboost lstm gnn ensemble`)", field="model_types")
