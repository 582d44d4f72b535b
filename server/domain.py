"""Domain values of the registry: frozen dataclasses the service works with.

The MLflow adapter builds them; the converters turn them into protobuf messages.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

PRODUCTION_ALIAS = "production"
STAGING_ALIAS = "staging"
ARCHIVED_TAG = "aqimodels.archived"
ARCHIVED_TIME_TAG = "aqimodels.archived_time"
PREVIOUS_PRODUCTION_TAG = "aqimodels.previous_production"
PROMOTED_TIME_TAG = "aqimodels.promoted_time"
JOB_ID_TAG = "job_id"
MODEL_TYPE_TAG = "model_type"


def tag_time(ms: int) -> str:
    """A time written in an MLflow tag: ISO-8601 UTC (``2026-12-01T20:35:00.123Z``), readable in MLflow's UI."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def tag_time_ms(raw: str) -> int | None:
    """The epoch ms of a tag written by :func:`tag_time` (or, by older versions, as epoch ms)."""
    from datetime import datetime

    raw = raw.strip()
    if raw.isdigit():
        return int(raw)
    try:
        return int(datetime.fromisoformat(raw).timestamp() * 1000)
    except ValueError:
        return None


class Stage(enum.Enum):
    """User-visible lifecycle stage (proto enum numbers)."""

    NONE = 1
    STAGING = 2
    PRODUCTION = 3
    ARCHIVED = 4


# Metrics where a higher value is better; every other metric is lower-is-better.
_HIGHER_IS_BETTER_PREFIXES = ("r2", "accuracy", "aqi_accuracy", "skill", "inference_throughput")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (r2, accuracy, skill, throughput)."""
    return metric.startswith(_HIGHER_IS_BETTER_PREFIXES)


def is_better(metric: str, candidate: float, reference: float, margin: float = 0.0) -> bool:
    """True when ``candidate`` beats ``reference`` on ``metric`` by at least ``margin`` (relative)."""
    if math.isnan(candidate):
        return False
    if math.isnan(reference):
        return True
    if higher_is_better(metric):
        return candidate > reference + abs(reference) * margin
    return candidate < reference - abs(reference) * margin


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    run_id: str
    source: str
    create_time_ms: int
    update_time_ms: int
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    description: str = ""

    @property
    def stage(self) -> Stage:
        if PRODUCTION_ALIAS in self.aliases:
            return Stage.PRODUCTION
        if STAGING_ALIAS in self.aliases:
            return Stage.STAGING
        if self.tags.get(ARCHIVED_TAG) == "true":
            return Stage.ARCHIVED
        return Stage.NONE

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def job_id(self) -> str:
        return self.tags.get(JOB_ID_TAG, "")


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    create_time_ms: int
    update_time_ms: int
    aliases: dict[str, int] = field(default_factory=dict)
    version_count: int = 0
    latest_version: int = 0

    @property
    def production_version(self) -> int:
        return self.aliases.get(PRODUCTION_ALIAS, 0)

    @property
    def staging_version(self) -> int:
        return self.aliases.get(STAGING_ALIAS, 0)


@dataclass(frozen=True)
class BackendHealth:
    healthy: bool
    tracking_uri: str
    message: str = ""
    latency_ms: float = 0.0


@dataclass(frozen=True)
class AuditRecord:
    id: str
    sequence: int
    time_ms: int
    actor: str
    role: str
    action: str
    model_name: str
    version: int
    before: dict[str, object]
    after: dict[str, object]
    outcome: str
    request_id: str
    message: str


@dataclass(frozen=True)
class Page:
    """One page of a listing and the opaque token of the next (empty on the last page)."""

    items: list  # type: ignore[type-arg]
    next_page_token: str
    total_size: int
