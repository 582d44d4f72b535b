"""The time budget of the code running now (a context var); the budget itself is ``client.domain.Deadline``.

The servicer turns a gRPC call's deadline and liveness into a :class:`Deadline` and passes it to
the service inside the ``Caller``; the interceptor also binds it for the whole call (``bind``),
so that the database layer (server/dbtimeouts.py) bounds every wait of that call by it without
the deadline being threaded through every read. Background threads bind short budgets of their
own (the health probe) or none (the default statement timeout applies).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from aqimodels.client.domain import NO_DEADLINE, Deadline

__all__ = ["NO_DEADLINE", "Deadline", "bound", "current", "set_current", "wait_bound", "within"]


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
