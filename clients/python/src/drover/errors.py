"""Exceptions a producer can catch; each message names the key, field and value involved."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import Outcome


class DroverError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidJob(DroverError, ValueError):
    """A job drover would refuse: the message names the field and the value.

    Raised before anything is written, so nothing is half-recorded.
    """

    def __init__(self, key: str | None, field: str, reason: str) -> None:
        self.key = key
        self.field = field
        self.reason = reason
        prefix = f"{key}: " if key else ""
        super().__init__(f'{prefix}field "{field}": {reason}')


class Conflict(DroverError):
    """An idempotency key already exists for a different request; nothing was published.

    ``conflicts`` holds one line per refused key (``KEY: already exists (STATE) with different
    params (period: "2026-11" vs "2026-12"); nothing published``). From ``publish_many``,
    ``outcomes`` lists what happened to every job of the call: the others were published.
    """

    def __init__(self, conflicts: list[str], outcomes: list[Outcome] | None = None) -> None:
        self.conflicts = conflicts
        self.outcomes = outcomes or []
        super().__init__("\n".join(conflicts))


class WaitTimeout(DroverError, TimeoutError):
    """``Client.wait`` gave up; ``pending`` lists ``key (state)`` of the unfinished jobs."""

    def __init__(self, seconds: float, pending: list[str]) -> None:
        self.pending = pending
        super().__init__(f"timed out after {seconds:g}s waiting for {', '.join(pending)}")


class Transient(Exception):
    """Raised by an ``exec`` batch function for a failure worth retrying (a timeout, a busy
    service): ``drover.exec.serve`` exits with 75 (EX_TEMPFAIL) and drover retries the job
    with backoff. Any other exception fails the job permanently."""
