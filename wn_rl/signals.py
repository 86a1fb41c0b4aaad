"""Stopping a training loop cleanly on SIGINT/SIGTERM (the native DQN's loop, the paper models' loops)."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["StopOnSignals"]


class StopOnSignals:
    """Inside ``with StopOnSignals(holder, "the current step"):`` SIGINT and SIGTERM set
    ``holder.stop_signal``: the loop finishes what it is doing, writes a checkpoint and exits with 128 + the
    signal. A second SIGINT raises ``KeyboardInterrupt`` at once (printing ``again`` first, if given). The
    handlers are installed only in the main thread and only when ``enabled``; the previous ones are
    restored on exit."""

    def __init__(self, holder: Any, finishing: str, *, again: str | None = None, enabled: bool = True) -> None:
        self.holder = holder
        self.finishing = finishing
        self.again = again
        self.enabled = enabled
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.holder.stop_signal is not None and signum == signal.SIGINT:
            if self.again:
                print(self.again, flush=True)
            raise KeyboardInterrupt
        self.holder.stop_signal = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: finishing {self.finishing} and writing a checkpoint (Ctrl-C again to quit now)", flush=True)

    def __enter__(self) -> StopOnSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
