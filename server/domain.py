"""Domain values of the registry: frozen dataclasses the service works with.

The MLflow adapter builds them; the converters turn them into protobuf messages.
"""

from __future__ import annotations

import array
import enum
import math
from collections.abc import Iterator, Mapping, Sequence
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


class MetricValues(Mapping[str, float]):
    """A run's metrics, read-only: the names shared by every run with the same metric set, the
    values in one array of doubles.

    The read model holds one per version: as a dict of 27 metrics that was 1.5 KB (dict and float
    objects), most of a version's memory; this is about 400 bytes (bench/NOTES.md).
    """

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: array.array[float]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: str) -> float:
        return self._values[self._index[key]]

    def get(self, key: str, default: float | None = None) -> float | None:  # type: ignore[override]  # narrower than Mapping.get's overloads: a float or the default
        i = self._index.get(key)
        return default if i is None else self._values[i]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def items(self) -> Iterator[tuple[str, float]]:  # type: ignore[override]  # an iterator over the two arrays, not a view
        return zip(self._index, self._values, strict=True)

    def __repr__(self) -> str:
        return f"MetricValues({dict(self.items())!r})"


_SCHEMAS: dict[tuple[str, ...], dict[str, int]] = {}
_MAX_SCHEMAS = 10_000


def metric_values(names: Sequence[str], values: Sequence[float]) -> MetricValues:
    """MetricValues of ``names`` (unique) and their ``values``; the name index is shared by every
    call with the same names in the same order (up to 10,000 distinct sets)."""
    key = tuple(names)
    index = _SCHEMAS.get(key)
    if index is None:
        index = {n: i for i, n in enumerate(key)}
        if len(index) != len(key):  # a repeated name: the last value wins, as in a dict
            merged = dict(zip(key, values, strict=True))
            return metric_values(list(merged), list(merged.values()))
        if len(_SCHEMAS) < _MAX_SCHEMAS:
            _SCHEMAS[key] = index
    return MetricValues(index, array.array("d", values))


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One version as the read model holds it (slots: a version is about 1 KB in all, bench/NOTES.md)."""

    name: str
    version: int
    run_id: str
    source: str
    create_time_ms: int
    update_time_ms: int
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
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

    items: list  # type: ignore[type-arg]  # a page of any listing (models, versions, audit records)
    next_page_token: str
    total_size: int
