"""SIGTERM / SIGUSR1 stop a run cleanly, whatever phase it is in.

Handlers are installed before anything else: by the command line before its imports when the command
is ``train`` (``install_early``), and when a run starts; a signal during start-up, the DPO
reference pass or a step sets a flag, which every rank reads through one all-reduce at its next
check (``any_rank_stopping``), so all ranks stop at the same point. In the loop the step in progress
finishes, a checkpoint is written and the run exits 0; before the first step there is nothing new to
save; in the reference pass the pass is abandoned (``RunStopped``) and runs again on resume.
"""

from __future__ import annotations

import signal
import sys
import threading

# This module is imported by the command line before torch: keep it light.
_early: dict = {"received": None}


def install_early() -> None:
    """Records SIGTERM / SIGUSR1 from now on; the run's ``StopSignals`` picks a recorded one up. For
    ``pivot-mega train``, whose imports take seconds: a job signalled then stops cleanly, not killed."""
    if threading.current_thread() is not threading.main_thread():
        return

    def record(number, frame) -> None:
        if _early["received"] is None:
            _early["received"] = signal.Signals(number).name
            print(f"pivot-mega train: {_early['received']} received while starting; the run will stop before "
                  f"its first step", file=sys.stderr, flush=True)
    for name in StopSignals.SIGNALS:
        signal.signal(getattr(signal, name), record)


class RunStopped(Exception):
    """A stop signal ended the run outside the training loop; ``str()`` says where and what is lost."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name


class StopSignals:
    """SIGTERM / SIGUSR1 (SLURM's pre-timeout warning) set a flag; the step in progress finishes, a
    checkpoint is written and the run exits 0. A second signal changes nothing: the save is under way."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    OTHER_RANK = "a signal on another rank"

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> "StopSignals":
        # Python delivers signals to the main thread only; elsewhere (a test's worker thread) none is installed.
        if _early["received"] is not None:
            self.received, _early["received"] = _early["received"], None
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            print(f"pivot-mega train: {self.received} received; stopping at the next step boundary, then saving",
                  file=sys.stderr, flush=True)

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def any_rank_stopping(self, device) -> str | None:
        """The signal's name when any rank received one (an all-reduce: call on all ranks), else None."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor(float(self.received is not None), dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag)
        if flag.item() == 0:
            return None
        return self.received or self.OTHER_RANK
