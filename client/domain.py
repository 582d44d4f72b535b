"""The vocabulary that the client, the registry and the worker share.

Model types (name <-> enum number, the registered ``aqi_predictor_<type>`` names), who is calling
and until when (:class:`Caller`, :class:`Deadline`), and the checks of names, versions and metric
names that every entry point applies. It lives with the client, the published contract, because
the client may import nothing else of ours and the registry and the worker import the client.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.errors import CancelledError, DeadlineExceededError, InvalidArgumentError

# ---- model types ----

ModelType: TypeAlias = wpb.ModelType.ValueType

MODEL_TYPES: dict[str, ModelType] = {
    "xgboost": wpb.MODEL_TYPE_XGBOOST,
    "lstm": wpb.MODEL_TYPE_LSTM,
    "gnn": wpb.MODEL_TYPE_GNN,
    "ensemble": wpb.MODEL_TYPE_ENSEMBLE,
}
"""The trainable model types by name, in training order (the ensemble after its members)."""

MODEL_TYPE_NAMES: tuple[str, ...] = tuple(MODEL_TYPES)
TYPE_NAMES: dict[ModelType, str] = {v: k for k, v in MODEL_TYPES.items()}
MEMBER_TYPES: tuple[ModelType, ...] = (wpb.MODEL_TYPE_XGBOOST, wpb.MODEL_TYPE_LSTM, wpb.MODEL_TYPE_GNN)
"""The types an ensemble is built from."""

MODEL_NAME_PREFIX = "aqi_predictor_"
DEFAULT_TARGET = "pm25"


def model_type_value(model_type: str | int) -> ModelType:
    """The enum number of a model type given by name ("lstm") or number."""
    if isinstance(model_type, int):
        return wpb.ModelType.ValueType(model_type)
    try:
        return MODEL_TYPES[model_type.strip().lower()]
    except KeyError:
        raise InvalidArgumentError(f"unknown model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}",
                                   field="model_types") from None


def model_type_name(value: int) -> str:
    """The name of a model type's enum number ("unspecified" for one we do not know)."""
    return TYPE_NAMES.get(wpb.ModelType.ValueType(value), "unspecified")


def registered_model_name(model_type: str | int, target: str = DEFAULT_TARGET) -> str:
    """The registered MLflow model name of a model type, e.g. ``aqi_predictor_lstm``; a model of
    another target pollutant than PM2.5 gets it as a suffix: ``aqi_predictor_lstm_no2``."""
    type_name = model_type if isinstance(model_type, str) else TYPE_NAMES[wpb.ModelType.ValueType(model_type)]
    name = MODEL_NAME_PREFIX + type_name
    target = target.strip().lower()
    return name if target in ("", DEFAULT_TARGET) else f"{name}_{target}"


def model_type_of(name: str) -> str | None:
    """The model type whose PM2.5 model is registered as ``name`` (None for any other name)."""
    return next((t for t in MODEL_TYPE_NAMES if name == MODEL_NAME_PREFIX + t), None)


# ---- callers and their time budget ----


@dataclass(frozen=True)
class Deadline:
    """When the caller stops waiting (monotonic seconds; None: never) and whether it still waits.

    ``active`` answers False once the caller cancelled (or its deadline passed, as gRPC sees it).
    """

    expires_at: float | None = None
    active: Callable[[], bool] | None = None
    margin: float = 0.0  # kept for the answer to travel back (see answer_within)

    @classmethod
    def after(cls, seconds: float | None, active: Callable[[], bool] | None = None) -> Deadline:
        if seconds is None:
            return cls(None, active)
        seconds = max(0.0, seconds)
        return cls(time.monotonic() + seconds, active, min(0.5, 0.15 * seconds))

    def remaining(self) -> float | None:
        """Seconds left (never negative), None without a deadline."""
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - time.monotonic())

    def expired(self) -> bool:
        return self.expires_at is not None and time.monotonic() >= self.expires_at

    def cancelled(self) -> bool:
        return self.active is not None and not self.active()

    def problem(self) -> str:
        """'' while the caller still waits, else why not ('deadline' or 'cancelled')."""
        if self.expired():
            return "deadline"
        if self.cancelled():
            return "cancelled"
        return ""

    def check(self, what: str) -> None:
        """Raises DeadlineExceededError / CancelledError when the caller no longer waits."""
        problem = self.problem()
        if problem == "deadline":
            raise DeadlineExceededError(f"the call's deadline passed before {what}; nothing was changed")
        if problem == "cancelled":
            raise CancelledError(f"the call was cancelled before {what}; nothing was changed")

    def answer_within(self) -> float | None:
        """Seconds a wait may take so that the caller still gets our answer before its deadline.

        A margin (15% of the whole budget, at most 0.5 s) is kept for the answer to travel back:
        a wait bounded exactly by the deadline would race the client's own DEADLINE_EXCEEDED.
        """
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - self.margin - time.monotonic())


NO_DEADLINE = Deadline()


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's name and role ("anonymous" without authentication)."""

    name: str = "anonymous"
    role: str = "admin"
    request_id: str = ""
    deadline: Deadline = NO_DEADLINE  # the call's budget: a change whose caller left writes nothing


# ---- checks of what callers send ----

MAX_NAME_LENGTH = 256
METRIC_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/ ]{1,250}$")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")


def validate_name(name: str, field_name: str = "name") -> str:
    if not name or not name.strip():
        raise InvalidArgumentError(f"{field_name} is required", field=field_name)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(f"{field_name} is longer than {MAX_NAME_LENGTH} characters",
                                   field=field_name)
    if _CONTROL_CHARACTERS.search(name):
        raise InvalidArgumentError(f"{field_name} contains control characters", field=field_name)
    return name


def validate_version(version: int, field_name: str = "version") -> int:
    if version <= 0:
        raise InvalidArgumentError(f"{field_name} must be a positive integer, got {version}", field=field_name)
    return version


def validate_metric(metric: str, field_name: str = "metric") -> str:
    metric = metric or "rmse"
    if not METRIC_NAME_RE.match(metric):
        raise InvalidArgumentError(f"{field_name} {metric[:50]!r} is not a valid metric name", field=field_name)
    return metric
