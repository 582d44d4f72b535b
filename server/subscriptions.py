"""A follower's side of a live stream: the items its own queue receives, until the end or a stop.

Retrain-job watchers and alert watchers each get a ``queue.Queue`` that the publisher puts
events on and ``None`` on at the end. Waiting on it in short polls lets a follower notice that it
should stop (its caller left, the server is stopping) without an item arriving.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def follow(q: queue.Queue[T | None], keep_going: Callable[[], bool], poll_seconds: float) -> Iterator[T | None]:
    """The items put on ``q`` until its end (a ``None`` put by the publisher) or until
    ``keep_going()`` answers False; a ``None`` is yielded after every poll in which nothing came, so
    the follower may give up on other grounds."""
    while keep_going():
        try:
            item = q.get(timeout=poll_seconds)
        except queue.Empty:
            yield None
            continue
        if item is None:
            return
        yield item
