"""The plain-data histogram: buckets include their bound, reports sum."""

from __future__ import annotations

from glb.histogram import Histogram


def test_observations_fall_in_the_first_bucket_at_or_above_them():
    h = Histogram([0.01, 0.1, 1.0])
    for v in (0.005, 0.01, 0.05, 2.0):
        h.observe(v)
    assert h.counts == [2, 1, 0, 1]
    assert h.cumulative() == [("0.01", 2), ("0.1", 3), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and abs(h.sum - 2.065) < 1e-9


def test_reports_of_several_workers_sum():
    a, b = Histogram([1, 10]), Histogram([1, 10])
    a.observe(1)
    b.observe(5)
    b.observe(50)
    m = Histogram.merged([a.as_dict(), b.as_dict()])
    assert m.counts == [1, 1, 1] and m.count == 3 and m.sum == 56
    assert Histogram.merged([]) is None
