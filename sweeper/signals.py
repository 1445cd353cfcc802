"""SIGTERM stops a sweep the way Ctrl-C does.

Batch systems and `kill` send SIGTERM. Ray's driver set-up turns it into `sys.exit`, which
tears Ray down mid-step (an abort with a core dump, runs left RUNNING, no resume hint).
Here SIGTERM is handed to whatever handles SIGINT at that moment: Ray Tune's handler while
`Tuner.fit` runs (it stops the trials, saves the experiment state one last time and
returns), Python's KeyboardInterrupt before and after. The driver then marks unfinished
runs interrupted and prints the resume command. Exit status: 130 after SIGINT, 143 after
SIGTERM (128 + the signal number, the shell's convention).
"""

from __future__ import annotations

import signal
import threading

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class StopSignals:
    """`with StopSignals() as stop:` routes SIGTERM to the SIGINT handler; `stop.exit_code`
    is what the driver returns when it was stopped (130 unless SIGTERM came)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = None

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def install(self) -> None:
        """(Re)install the SIGTERM handler: `ray.init` replaces it with its own."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        previous = signal.signal(signal.SIGTERM, self._on_term)
        if self._previous is None:
            self._previous = previous

    @property
    def exit_code(self) -> int:
        return EXIT_TERMINATED if self.received == signal.SIGTERM else EXIT_INTERRUPTED

    def _on_term(self, signum, frame) -> None:
        self.received = signum
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)  # Tune's: stop at the next step, save, return
        else:
            raise KeyboardInterrupt
