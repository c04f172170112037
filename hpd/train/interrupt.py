"""SIGINT and SIGTERM during a run: finish the step, checkpoint, say how to resume.

Clusters send SIGTERM before preempting a job, and Ctrl-C sends SIGINT. The first signal
only sets a flag: the loop finishes the step it is in, the run writes a checkpoint and
stops with `Interrupted`, whose `status` is the conventional exit status (128 + signal:
130 for SIGINT, 143 for SIGTERM). A second signal exits at once with that status; the
checkpoint being written, if any, is a temporary folder that the next run removes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; str() says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.status = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopOnSignal:
    """Context manager: while inside, SIGINT/SIGTERM request a stop instead of killing.

    Handlers can only be installed from the main thread; elsewhere (a notebook worker
    thread, a test runner thread) it is inert and signals keep their usual effect."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        name = signal_name(signum)
        if self.signum is not None:
            print(f"\n{name} again: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{name}: finishing the current step, then writing a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


__all__ = ["Interrupted", "StopOnSignal", "signal_name"]
