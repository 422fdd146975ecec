"""The pretraining loop's periodic work in small pieces: when (`every`), how fast
(`Throughput`) and when to stop (`Preemption`).

simclr_jax.train calls them once per step; each holds its own bookkeeping (timing intervals,
the SIGTERM flag and handler), so the loop keeps only the metrics since the last sync.
"""

import math
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


def every(step: int, n: int) -> bool:
    """Whether periodic work with period n (steps; <= 0 = never) is due after `step` steps."""
    return n > 0 and step % n == 0


class Throughput:
    """Training speed between host syncs, without the compiling first step and evaluations.

    `restart()` opens an interval, `tick()` counts a step in it, `lap()` closes it; the run's
    speed is over all closed intervals.

    Args:
      images_per_step: the global batch (images; each gives two views).
    """

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self._start: float | None = None
        self._steps = 0
        self._timed_seconds = 0.0
        self._timed_steps = 0

    def restart(self) -> None:
        """Starts a new interval now (after compiling, after an evaluation)."""
        self._start, self._steps = time.time(), 0

    def tick(self) -> None:
        """Counts one step in the current interval (not called for the compiling step)."""
        self._steps += 1

    def lap(self) -> dict[str, float]:
        """Closes the interval and starts the next.

        Returns:
          {'train/steps_per_sec', 'train/images_per_sec'} of the interval; {} if it had no
          timed step.
        """
        scalars = {}
        if self._steps and self._start is not None:
            seconds = time.time() - self._start
            self._timed_seconds += seconds
            self._timed_steps += self._steps
            scalars = {
                "train/steps_per_sec": self._steps / seconds,
                "train/images_per_sec": self._steps * self.images_per_step / seconds,
            }
        self.restart()
        return scalars

    @property
    def images_per_sec(self) -> float:
        """Images per second over every closed interval (NaN before the first)."""
        if not self._timed_seconds:
            return math.nan
        return self._timed_steps * self.images_per_step / self._timed_seconds


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective: all must call it)."""
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.asarray(flags).any())


class Preemption:
    """SIGTERM (or `request()`) -> save a checkpoint and stop at a step boundary.

    A context manager: installs its SIGTERM handler on entry and restores the previous one on
    exit. With several processes, SIGTERM reaches hosts at different steps, but all must stop
    at the same one or the collective save deadlocks: they agree at steps every host syncs at
    anyway (`stop_now(at_sync=True)`).
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "Preemption":
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum, frame) -> None:
        del frame
        self.requested = True
        print(f"received signal {signum}: saving a checkpoint at the next step", flush=True)

    def request(self) -> None:
        """Asks for a stop as SIGTERM would (config.train.stop_at_step)."""
        self.requested = True

    def stop_now(self, *, at_sync: bool) -> bool:
        """Whether to save and stop after this step.

        Args:
          at_sync: this step is one where every process syncs anyway (log, save, or the
            configured stop step). Processes only agree there (a collective).
        """
        if jax.process_count() == 1:
            return self.requested
        return at_sync and any_process(self.requested)
