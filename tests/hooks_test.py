"""simclr_jax.hooks: the pretraining loop's periodic work."""

import math
import os
import signal

import pytest

from simclr_jax import hooks


def test_every():
    assert [s for s in range(1, 10) if hooks.every(s, 3)] == [3, 6, 9]
    assert not any(hooks.every(s, 0) for s in range(1, 10))  # 0: never
    assert not hooks.every(5, -1)


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_counts_only_timed_steps(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(hooks.time, "time", clock)
    t = hooks.Throughput(images_per_step=16)
    assert math.isnan(t.images_per_sec)
    t.restart()  # after the compiling first step
    for _ in range(4):
        t.tick()
    clock.now += 2.0
    assert t.lap() == {"train/steps_per_sec": 2.0, "train/images_per_sec": 32.0}
    clock.now += 50.0  # a checkpoint write, excluded by the restart that follows it
    t.restart()
    assert t.lap() == {}  # no timed step: nothing to report, nothing counted
    t.tick()
    clock.now += 3.0
    assert t.lap() == {"train/steps_per_sec": 1 / 3.0, "train/images_per_sec": 16 / 3.0}
    assert t.images_per_sec == pytest.approx(5 * 16 / 5.0)


def test_preemption_turns_sigterm_into_a_stop_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with hooks.Preemption() as preemption:
        assert not preemption.stop_now(at_sync=True)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested
        # One process: stops at the next step, whether or not every host syncs there.
        assert preemption.stop_now(at_sync=False)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_preemption_request():
    with hooks.Preemption() as preemption:
        preemption.request()
        assert preemption.stop_now(at_sync=True)
