"""Running beside other processes: signals that stop a run at a batch boundary, and claims on cells
kept alive by heartbeats, so several ``harness run`` processes on one results DB compute every cell
once. A claim whose heartbeat is older than ``$HARNESS_CLAIM_TIMEOUT`` seconds (default 120) belongs to a
dead process and is taken over.

Nothing here depends on the back end: a claim is taken by one atomic statement of
:mod:`harness.results.queries` (``INSERT ... ON CONFLICT DO NOTHING`` on the cell key, or an ``UPDATE``
conditioned on the expired heartbeat, which PostgreSQL re-checks on the row it locks and SQLite runs
under its write lock), so processes on one SQLite file or on one PostgreSQL database, on any number of
machines, compute every cell once. A heartbeat that waits for a batch's transaction (PostgreSQL's row
lock on the claim) is only late, never lost."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from harness.core.errors import UsageError
from harness.results.queries import claim_cell, refresh_claims, release_claim, touch_claim

__all__ = ["CLAIM_TIMEOUT_ENV", "DEFAULT_CLAIM_TIMEOUT", "Signals", "Claims", "ClaimLost", "claim_timeout"]

log = logging.getLogger(__name__)
#: seconds without a heartbeat after which a claim on a cell is taken over (its owner is presumed dead)
CLAIM_TIMEOUT_ENV = "HARNESS_CLAIM_TIMEOUT"
DEFAULT_CLAIM_TIMEOUT = 120.0


class Signals:
    """SIGINT/SIGTERM in a :meth:`deferred` stretch (a cell's batches, a claim's write) stop the run at its
    end: after the batch in flight is committed. A second signal, or one at any other moment (training,
    waiting), stops it at once. Handlers are installed only in the main thread, and restored on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signum
        if not (first and self._deferring):
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold signals back until the end of the block, then stop there if one came."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self.check()

    def check(self) -> None:
        if self.received is not None:
            raise KeyboardInterrupt


class Claims:
    """This process's claims on cells (owner ``host:pid:token``), kept alive by a heartbeat thread every
    quarter of the timeout (at most 10 s), on top of the heartbeat of every batch commit."""

    def __init__(self, engine: Engine, timeout: float):
        self.engine, self.timeout = engine, timeout
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="harness-heartbeat", daemon=True)

    def __enter__(self) -> Claims:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def acquire(self, key: str) -> bool:
        return claim_cell(self.engine, key, self.owner, self.timeout)

    def release(self, key: str) -> None:
        release_claim(self.engine, key, self.owner)

    def touch(self, session: Session, key: str) -> bool:
        return touch_claim(session, key, self.owner)

    def _beat(self) -> None:
        while not self._stop.wait(min(10.0, self.timeout / 4)):
            try:
                refresh_claims(self.engine, self.owner)
            except Exception:  # noqa: BLE001 - a missed heartbeat is made up by the next one
                log.warning("could not refresh the claims of %s", self.owner, exc_info=True)


def claim_timeout() -> float:
    value = os.environ.get(CLAIM_TIMEOUT_ENV, "")
    try:
        timeout = float(value) if value else DEFAULT_CLAIM_TIMEOUT
    except ValueError:
        timeout = 0.0
    if not timeout > 0:
        raise UsageError(f"${CLAIM_TIMEOUT_ENV} must be a number of seconds > 0, got {value!r}")
    return timeout


class ClaimLost(Exception):
    """Another process took over this cell's claim (ours had expired): the cell is left to it."""
