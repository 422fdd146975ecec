"""Accuracies as counts of examples, so tolerances on them are exact integers.

An accuracy over n examples is k / n for an integer k; comparing two such
fractions with a float tolerance (|0.24 - 0.238| <= 2 / 1000) fails on
rounding (0.0020000000000000018). Tests compare k instead.
"""


def correct_count(fraction: float, n: int) -> int:
    """The integer k with k / n == fraction (to float rounding).

    Raises:
      AssertionError: if `fraction` is not a multiple of 1 / n, i.e. it was not
        computed over exactly n examples.
    """
    k = round(fraction * n)
    assert abs(k - fraction * n) < 1e-6, f"{fraction} is not a count over {n} examples"
    return k
