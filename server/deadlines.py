"""A call's time budget as a domain value, and the budget of the code running now (a context var).

The servicer turns a gRPC call's deadline and liveness into a :class:`Deadline` and passes it to
the service inside the ``Caller``; the interceptor also binds it for the whole call (``bind``),
so that the database layer (server/dbtimeouts.py) bounds every wait of that call by it without
the deadline being threaded through every read. Background threads bind short budgets of their
own (the health probe) or none (the default statement timeout applies).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aqimodels.client.errors import CancelledError, DeadlineExceededError


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

_current: contextvars.ContextVar[Deadline] = contextvars.ContextVar("aqimodels_deadline", default=NO_DEADLINE)


def current() -> Deadline:
    """The budget of the code running now (NO_DEADLINE outside a call)."""
    return _current.get()


def set_current(deadline: Deadline) -> None:
    """Binds ``deadline`` for the rest of this context (the interceptor, once per call)."""
    _current.set(deadline)


@contextlib.contextmanager
def bound(deadline: Deadline) -> Iterator[Deadline]:
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


def within(seconds: float) -> contextlib.AbstractContextManager[Deadline]:
    """A budget of ``seconds`` from now, or the current one when that ends sooner."""
    mine = Deadline.after(seconds)
    outer = current()
    if outer.expires_at is not None and mine.expires_at is not None and outer.expires_at < mine.expires_at:
        mine = outer
    return bound(mine)


def wait_bound(default: float | None) -> float | None:
    """The longest a database wait may take now: ``default`` shortened to the current budget."""
    left = current().answer_within()
    if left is None:
        return default
    return left if default is None else min(default, left)
