"""Bounded database waits for any SQLAlchemy engine (ours and MLflow's): written by hand because
neither SQLAlchemy nor psycopg bounds a wait on a server that stopped answering.

PostgreSQL's own ``statement_timeout`` and ``lock_timeout`` (set for every connection here) end
slow statements and lock waits, but a frozen server (SIGSTOP, a stalled host) enforces nothing
and its kernel still acknowledges every packet, so TCP timeouts never fire either: psycopg then
waits for ever. Every wait of a psycopg connection made here is therefore also bounded on the
client side, by the statement timeout shortened to the current call's budget
(:mod:`aqimodels.process.deadlines`); a wait that runs out closes the connection (the server
drops it too, ``client_connection_check_interval``), and the error is a connection error that
the callers turn into UNAVAILABLE. Closing, not cancelling: a cancel request needs the server
to answer, and an open transaction whose COMMIT was not sent is rolled back by the server.
SQLite: the busy timeout, shortened to the budget per checkout.

The wait for a free pooled connection (SQLAlchemy's ``pool_timeout``, 30 s by default, and MLflow
offers no setting for it) is the connect bound shortened to the call's budget too
(:class:`BoundedQueuePool`): with more concurrent calls than connections on a frozen server, a
call queued behind the blocked ones answers UNAVAILABLE within its own deadline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aqimodels.process import deadlines
from sqlalchemy.pool import QueuePool

if TYPE_CHECKING:
    import psycopg


@dataclass(frozen=True)
class DbTimeouts:
    """Seconds: connect, statement, lock wait (each shortened to a call's budget where shorter)."""

    connect: float = 5.0
    statement: float = 30.0
    lock: float = 10.0


def _bounded_psycopg_connection(timeouts: DbTimeouts) -> type[psycopg.Connection[Any]]:
    import psycopg
    from psycopg import errors as e

    class BoundedConnection(psycopg.Connection[Any]):
        """A psycopg connection whose every wait ends at the statement bound or the call's budget."""

        statement_bound: float = timeouts.statement

        @classmethod
        def _connect_gen(cls, conninfo: str = "") -> Any:
            # psycopg's own connect timeout is whole seconds, at least 2 (libpq's rule): the
            # connection is driven here and given up at the connect bound shortened to the budget.
            wait = deadlines.wait_bound(timeouts.connect)
            end = time.monotonic() + (timeouts.connect if wait is None else wait)
            inner = super()._connect_gen(conninfo)
            value = next(inner)
            while True:
                if time.monotonic() >= end:
                    inner.close()
                    raise e._WaitTimeout("connect timeout")  # psycopg reports ConnectionTimeout
                try:
                    value = inner.send((yield value))
                except StopIteration as stop:
                    return stop.value

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            bound = deadlines.wait_bound(self.statement_bound)
            if timeout is not None:
                bound = timeout if bound is None else min(bound, timeout)
            try:
                return super().wait(gen, interval=interval, timeout=bound)
            except e._WaitTimeout:  # psycopg's own wait-timeout signal
                if timeout is not None and bound == timeout:
                    raise  # a timeout the caller asked for itself (notifies)
                self.pgconn.finish()  # the server stopped answering: drop the connection
                raise e.OperationalError(
                    f"the database did not answer within {bound:.2f} s (connection closed)") from None

    return BoundedConnection


class BoundedQueuePool(QueuePool):
    """A QueuePool whose wait for a free connection ends at its timeout shortened to the call's budget.

    QueuePool reads ``self._timeout`` at each wait; here it is a property over the current
    (context-local, so per-thread) budget, so one pool serves calls with different deadlines.
    """

    _timeout_default: float = 30.0

    @property
    def _timeout(self) -> float:
        bound = deadlines.wait_bound(self._timeout_default)
        return self._timeout_default if bound is None else bound

    @_timeout.setter
    def _timeout(self, value: float) -> None:
        self._timeout_default = value

    @classmethod
    def like(cls, pool: QueuePool, timeout: float) -> BoundedQueuePool:
        """The same pool as ``pool`` (size, overflow, pre-ping, recycle, events) with this wait bound."""
        return cls(pool._creator, pool_size=pool._pool.maxsize, max_overflow=pool._max_overflow,
                   pre_ping=pool._pre_ping, use_lifo=pool._pool.use_lifo, timeout=timeout,
                   recycle=pool._recycle, echo=pool.echo, logging_name=pool._orig_logging_name,
                   reset_on_return=pool._reset_on_return, _dispatch=pool.dispatch,
                   dialect=pool._dialect)

    def recreate(self) -> BoundedQueuePool:  # engine.dispose(): keep the default, not a call's budget
        return BoundedQueuePool.like(self, self._timeout_default)


def bound_engine(engine: sa.Engine, timeouts: DbTimeouts) -> None:
    """Installs connect, statement, lock and pool-wait timeouts on ``engine`` (pooled connections are dropped)."""
    name = engine.dialect.name
    if isinstance(engine.pool, QueuePool) and not isinstance(engine.pool, BoundedQueuePool):
        old = engine.pool
        engine.pool = BoundedQueuePool.like(old, timeouts.connect)  # waiting for a connection is connecting
        old.dispose()
    if name == "postgresql" and engine.dialect.driver == "psycopg":
        cls = _bounded_psycopg_connection(timeouts)

        @sa.event.listens_for(engine, "do_connect")
        def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
            cparams["connect_timeout"] = max(2, math.ceil(timeouts.connect))  # the outer bound; see _connect_gen
            options = (f"-c statement_timeout={int(timeouts.statement * 1000)} "
                       f"-c lock_timeout={int(timeouts.lock * 1000)} "
                       "-c client_connection_check_interval=1000 "
                       "-c idle_in_transaction_session_timeout=" + str(int(max(60.0, timeouts.statement * 2) * 1000)))
            cparams["options"] = (cparams.get("options", "") + " " + options).strip()
            return cls.connect(*cargs, **cparams)

    elif name == "sqlite":
        default_ms = int(timeouts.lock * 1000)

        @sa.event.listens_for(engine, "connect")
        def _busy(dbapi_conn: Any, record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {default_ms}")
            cur.close()
            record.info["busy_ms"] = default_ms

        @sa.event.listens_for(engine, "checkout")
        def _shorten(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
            left = deadlines.current().answer_within()
            wanted = default_ms if left is None else max(1, min(default_ms, int(left * 1000)))
            if record.info.get("busy_ms") != wanted:
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout = {wanted}")
                cur.close()
                record.info["busy_ms"] = wanted
    engine.dispose()
