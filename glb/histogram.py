"""A Prometheus-style histogram as plain data: observed in a worker, summed
across workers, written out by a status endpoint.

Pure and picklable (it crosses the pipe from dnsfront's workers to their
supervisor as ``as_dict()``), with no Prometheus client: that is the status
endpoint's business.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any


class Histogram:
    """Counts of observations at or below each bound (``le``), their sum and count."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum, "count": self.count}

    @classmethod
    def merged(cls, reports: Iterable[dict[str, Any]]) -> Histogram | None:
        """The sum of several ``as_dict()`` reports of the same bounds (None if there are none)."""
        out: Histogram | None = None
        for r in reports:
            if out is None:
                out = cls(r["bounds"])
            if tuple(r["bounds"]) != out.bounds:
                continue  # another version's buckets: not summable
            out.counts = [a + b for a, b in zip(out.counts, r["counts"])]
            out.sum += r["sum"]
            out.count += r["count"]
        return out

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations at or below it) pairs, ``+Inf`` last: Prometheus's buckets."""
        out, total = [], 0
        for bound, n in zip([*map(_le, self.bounds), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))
