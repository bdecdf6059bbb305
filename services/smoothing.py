"""Moving means of measured costs, for figures that steer routing.

A cost measured once is noisy (one request shared its step with others, one poll saw one
load); the mean of everything since start never forgets a host that has since changed.
An exponentially weighted mean keeps what routing needs: recent samples count most, and
old ones fade at a known rate. Shared by the engines (prefill seconds per token) and the
router (a KV store's seconds per loaded block).
"""

from __future__ import annotations


class MovingMean:
    """An exponentially weighted mean: each sample moves it ``weight`` of the way.

    ``value`` is 0 until the first sample, which it takes whole (no zero start to
    climb out of): callers read 0 as "not measured yet".
    """

    def __init__(self, weight: float) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"a moving mean's weight is in (0, 1], not {weight}")
        self.weight = weight
        self.value = 0.0
        self.samples = 0

    def add(self, sample: float) -> float:
        """Take one sample; the new mean."""
        if self.samples == 0:
            self.value = sample
        else:
            self.value += self.weight * (sample - self.value)
        self.samples += 1
        return self.value


class CounterRate:
    """The smoothed ratio of two cumulative counters' growth between readings: for a
    figure a service sums since it started (seconds spent, and units done), the recent
    cost per unit.

    The first reading counts from zero (the mean since the service started). A reading
    below the last one (the service restarted) counts from zero again. Readings where
    no unit was done leave the mean as it was.
    """

    def __init__(self, weight: float) -> None:
        self.mean = MovingMean(weight)
        self._last = (0.0, 0)

    @property
    def value(self) -> float:
        """The recent cost per unit; 0 until a reading showed a unit done."""
        return self.mean.value

    def update(self, total: float, units: int) -> None:
        """Take the counters' current values (``total`` cost, ``units`` done)."""
        last_total, last_units = self._last
        if units < last_units or total < last_total:
            last_total, last_units = 0.0, 0
        if units > last_units:
            self.mean.add((total - last_total) / (units - last_units))
        self._last = (total, units)
