"""Checks of augmentation arguments, shared by the ops (augment.py) and the config (views.py).

Python values, checked once at trace time; a failed check raises ValueError
naming the argument, its value and what is allowed.
"""

from collections.abc import Sequence


def check_number(name, value, lo, hi, *, lo_open=False):
    """Checks a number in [lo, hi], or (lo, hi] when lo_open."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}={value!r}: expected a number in {_interval(lo, hi, lo_open)}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise ValueError(f"{name}={value!r}: allowed range is {_interval(lo, hi, lo_open)}")


def _interval(lo, hi, lo_open):
    return f"{'(' if lo_open else '['}{lo}, {hi}]"


def check_int(name, value, lo):
    """Checks an integer >= lo."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r}: expected an integer >= {lo}")


def check_pair(name, value, lo, hi, *, lo_open=True):
    """Checks an ordered (low, high) pair with both ends in the given interval."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name}={value!r}: expected a pair (low, high)")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{name}={value!r}: expected numbers in {_interval(lo, hi, lo_open)}")
        if v < lo or v > hi or (lo_open and v == lo):
            raise ValueError(f"{name}={value!r}: both ends must be in {_interval(lo, hi, lo_open)}")
    if value[0] > value[1]:
        raise ValueError(f"{name}={value!r}: low must be <= high")


def check_prob(name, value):
    """Checks a probability in [0, 1]."""
    check_number(name, value, 0.0, 1.0)
