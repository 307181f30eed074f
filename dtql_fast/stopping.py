"""Ctrl-C and SIGTERM during training: stop where a step ends, so the checkpoint holds a whole step."""
from __future__ import annotations

import signal
import threading

from tqdm import tqdm


class StopAtStepEnd:
    """Ctrl-C or SIGTERM ask the loop to stop where a step ends: a checkpoint of a half-updated
    agent would resume into other numbers. A second Ctrl-C stops at once, without a checkpoint."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> StopAtStepEnd:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping when this step ends, with a checkpoint "
                   "(Ctrl-C again: stop now, without one)")

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
