"""Stopping a run by signal: the first SIGINT or SIGTERM asks the loop to finish its step, save and
exit; a second one stops at once."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator

log = logging.getLogger("ijepa_fast")


class Aborted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: the run stops at once, without a checkpoint (the last one stays)."""

    def __init__(self, signum: int):
        super().__init__(
            f"{signal.Signals(signum).name} received again: stopped at once without saving; "
            f"--resume continues from the last checkpoint"
        )
        self.signum = signum


class Interrupted(Exception):
    """The first SIGINT or SIGTERM arrived inside ``StopOnSignals.interrupting``: what ran there stops."""


class StopOnSignals:
    """While entered, SIGINT/SIGTERM set ``received`` (the first one's number), which the training loop
    reads between steps (then it saves and exits); a second one raises ``Aborted``. Inside
    ``interrupting`` (the epoch-end callback, which may score the encoder for a while) the first one
    also raises ``Interrupted``, so the run does not wait for it to finish.

    Data-loader workers forked inside inherit the handler; they keep serving batches after the first
    signal (the loop may still fetch one) and leave the message to the main process."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        self.pid = os.getpid()
        self._interrupting = False

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """Within: a stop signal raises ``Interrupted`` where the code is (and none may have arrived)."""
        if self.received is not None:
            raise Interrupted
        self._interrupting = True
        try:
            yield
        finally:
            self._interrupting = False

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: give up at once
            raise Aborted(signum)
        self.received = signum
        if os.getpid() != self.pid:  # a forked worker
            return
        log.warning(
            "%s received: finishing this step, saving a checkpoint and exiting (a second one stops at once, "
            "without saving)",
            signal.Signals(signum).name,
        )
        if self._interrupting:
            raise Interrupted

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
