"""How a server process waits for its stop: SIGTERM (an orchestrator) or SIGINT (Ctrl-C)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import structlog

log = structlog.get_logger(__name__)


def wait_for_stop_signal() -> signal.Signals:
    """Blocks the main thread until SIGTERM or SIGINT arrives; returns which one (logged)."""
    done = threading.Event()
    received: list[signal.Signals] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    log.info("shutdown_requested", signal=received[0].name)
    return received[0]
