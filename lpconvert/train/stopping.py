"""How a run stops early and says so: a SIGINT/SIGTERM, a fixed number of iterations or the end of an epoch
(:class:`StopRequest`), caught from the first line of a run (:func:`signals_caught`) so that a stop during data
preparation or the start's evaluation ends every rank with the same line and nothing half-written
(:func:`stop_before_training`), and the exception that carries it (:class:`RunInterrupted`)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lpconvert.train.distributed import agree_on_stop

if TYPE_CHECKING:
    from lpconvert.train.runtime import Runtime

__all__ = ["RunInterrupted", "StopRequest", "signals_caught", "stop_before_training"]


class RunInterrupted(Exception):
    """Training stopped early (signal, ``stop_after`` or ``stop_at_epoch``). `saved`: a checkpoint was saved in
    `run_dir` to resume from; `planned`: the stop the caller asked for (``stop_at_epoch``), not an interruption;
    `how` says how to continue (``--resume RUN``; for a comparison, its command again)."""

    def __init__(self, reason: str, run_dir: Any, *, planned: bool = False, how: str | None = None,
                 saved: bool = True) -> None:
        super().__init__(reason)
        self.run_dir, self.planned, self.saved = run_dir, planned, saved
        self.how = how or f"--resume {run_dir}"


class StopRequest:
    """A SIGINT/SIGTERM handler, a fixed number of iterations or the end of an epoch: the loop saves a checkpoint at
    the next iteration boundary (for `at_epoch`, once that epoch is complete) and stops."""

    def __init__(self, after_iterations: int | None = None, at_epoch: int | None = None) -> None:
        self.signal: str | None = None
        self.after_iterations = after_iterations
        self.at_epoch = at_epoch
        self.announced = False

    def __call__(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def reason(self, iteration: int) -> str | None:
        if self.signal:
            return self.signal
        if self.after_iterations is not None and iteration >= self.after_iterations:
            return f"stopped after {iteration} iterations"
        return None

    def announce(self, runtime: Runtime) -> None:
        """Once, on the rank that got the signal, before it waits for the others to agree (up to --dist-timeout)."""
        if self.signal and runtime.distributed and not self.announced:
            self.announced = True
            print(f"rank {runtime.rank}: {self.signal}: stopping every rank at the next iteration boundary (waiting "
                  "for the others)", file=sys.stderr, flush=True)


@contextmanager
def signals_caught(stop: StopRequest, runtime: Runtime) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop` from here on (in the main thread). After an interruption of a distributed run the
    process keeps ignoring them: torchrun signals the other workers as soon as one exits, and they exit as it did."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except RunInterrupted:
        if runtime.distributed:
            previous = dict.fromkeys(previous, signal.SIG_IGN)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_before_training(stop: StopRequest, runtime: Runtime, run_dir: Any) -> None:
    """Between the steps before training (every rank calls it at the same point): a signal to any rank so far ends
    every rank with the same line — before the run folder exists (`run_dir` None: nothing was written), or before
    its first checkpoint (``--resume`` starts it again)."""
    stop.announce(runtime)
    reason = agree_on_stop(stop.signal, runtime)
    if reason is None:
        return
    if run_dir is None:
        raise RunInterrupted(f"{reason} before training", None, saved=False,
                             how="the same command (nothing was written)")
    raise RunInterrupted(f"{reason} before the first checkpoint", run_dir, saved=False,
                         how=f"--resume {run_dir} (it starts again)")
