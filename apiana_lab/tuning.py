"""`--batch-size auto`: a batch size (or requests in flight) picked from measured output tokens/s."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

AUTO = "auto"
# How far auto may climb: rows per batch, or requests in flight.
AUTO_MAX_SIZE = 256
# An engine whose KV cache is this full has no room for more sequences: more in flight would only queue.
TIGHT_KV_CACHE = 0.95


def is_auto(batch_size) -> bool:
    """Whether a batch-size setting asks for auto."""
    return isinstance(batch_size, str) and batch_size.strip().lower() == AUTO


def kv_cache_tight(provider) -> bool:
    """Whether the provider's engine says its KV cache is full (vLLM, or a vLLM server's /metrics); False when it
    does not say (transformers' token budget already keeps each micro-batch within memory)."""
    usage = provider.engine_metrics().get("kv_cache_usage_perc")
    return usage is not None and usage >= TIGHT_KV_CACHE


@dataclass(frozen=True, slots=True)
class Step:
    """A change the tuner asks for: the new size, why, and the throughput measured before it."""

    size: int
    reason: str
    tokens_per_s: float | None


class BatchTuner:
    """A bounded hill-climb over sizes, fed with the output tokens of each finished batch and when it finished.

    Each size is measured over a window: the first batch finished at that size is a warm-up, since
    it shared the engine with batches of the size before (and any such batch still finishing
    restarts the window); then at least `window` x size rows, so a batch path measures `window`
    batches and a path of single requests `window` rounds of them. The throughput is the output
    tokens of the measured batches over the time since the warm-up ended.

    From the start it climbs (x `factor`) while each size beats the one before by more than
    `tolerance`, then steps back to the best size and holds. When the first step up does not pay,
    it goes below the start and keeps going down while that pays. Memory that is tight at a
    size (the `tight` callable, asked when a window ends) steps back and holds too. Once it holds,
    it never probes again, so a run makes at most `max_changes` changes (log2(hi/lo) + 2 with the
    default factor) plus one per out-of-memory halving, and settles for good.

    An out-of-memory error is the floor under all this: `out_of_memory` caps every later size
    below the one that failed and holds at the halved size.

    Args:
        start: the first size. lo, hi: the range.
        window: rows measured per size, in multiples of the size (at least one batch each).
        tolerance: relative change in tokens/s that counts as a change, not noise.
        tight: called when a window ends; True means memory is tight at this size.
    """

    def __init__(
        self,
        start: int,
        *,
        lo: int = 1,
        hi: int = AUTO_MAX_SIZE,
        window: int = 2,
        tolerance: float = 0.05,
        factor: float = 2.0,
        tight: Callable[[], bool] | None = None,
    ):
        if not 1 <= lo <= hi or window < 1 or tolerance < 0 or factor <= 1:
            raise ValueError("BatchTuner needs 1 <= lo <= hi, window >= 1, tolerance >= 0 and factor > 1")
        self.lo, self.hi, self.window, self.tolerance, self.factor = lo, hi, window, tolerance, factor
        self.span = hi / lo  # the range it was given, for the bound on its changes
        self.tight = tight
        self.start = self.size = min(hi, max(lo, int(start)))
        self.epoch = 0  # bumped at every change: batches taken before it are stale
        self.settled = False
        self.rates: dict[int, float] = {}  # tokens/s measured at each size tried
        self.climbs = 0  # steps up taken from the start
        self.descending = False
        self.changes = 0
        self._reset()

    @property
    def max_changes(self) -> int:
        """The most changes the climb can make before it holds (out-of-memory halvings aside)."""
        return math.ceil(math.log(self.span, self.factor) - 1e-9) + 2

    def observe(self, epoch: int, rows: int, tokens: int, now: float) -> Step | None:
        """One finished batch (or request) taken at `epoch`: its rows, output tokens and finishing time.

        Returns the change to make, or None.
        """
        if self.settled:
            return None
        if epoch != self.epoch:  # taken before the last change: the window starts after it
            self._reset()
            self._since = now
            return None
        if self._since is None or self._warm:
            self._since = now if self._since is None else max(self._since, now)
            self._warm = False
            return None
        self._rows += rows
        self._tokens += tokens
        if self._rows < self.window * self.size or now <= self._since:
            return None
        rate = self._tokens / (now - self._since)
        self.rates[self.size] = rate
        return self._decide(self.size, rate)

    def out_of_memory(self, failed: int, new: int) -> None:
        """The batch of `failed` rows ran out of memory and the size is now `new`: never climb to `failed` again."""
        self.hi = max(self.lo, min(self.hi, failed - 1))
        self.size = max(self.lo, min(new, self.hi))
        self.epoch += 1
        self.settled = True
        self._reset()

    def _decide(self, size: int, rate: float) -> Step | None:
        best = max(self.rates, key=self.rates.get)
        others = {s: r for s, r in self.rates.items() if s != size}
        before = max(others.values()) if others else None
        if self.tight is not None and self.tight():
            self.hi = max(self.lo, min(self.hi, size - 1))
            smaller = [s for s in others if s < size]
            back = max(smaller, key=others.get) if smaller else self._next(size, down=True)
            return self._hold(back, f"auto: memory tight at {size}", rate)
        if not self.descending:
            if before is None or rate > before * (1 + self.tolerance):
                up = self._next(size)
                if up is not None:
                    self.climbs += 1
                    return self._move(up, f"auto: {rate:.1f} tok/s at {size}, trying {up}", rate)
                if self.climbs:
                    return self._hold(size, "", rate)  # climbed as far as it may
            # Climbing did not pay (or could not start): look below the start once.
            below = self._next(self.start, down=True)
            if self.climbs <= 1 and below is not None:
                self.descending = True
                than = f" is no better than {before:.1f}" if before is not None else ""
                return self._move(below, f"auto: {rate:.1f} tok/s at {size}{than}; trying {below}", rate)
            return self._hold(best, f"auto: {rate:.1f} tok/s at {size}; holding {best} ({self.rates[best]:.1f})", rate)
        if rate > before * (1 + self.tolerance):
            down = self._next(size, down=True)
            if down is None:
                return self._hold(size, "", rate)
            return self._move(down, f"auto: {rate:.1f} tok/s at {size}, trying {down}", rate)
        return self._hold(best, f"auto: {rate:.1f} tok/s at {size}; holding {best} ({self.rates[best]:.1f})", rate)

    def _next(self, size: int, down: bool = False) -> int | None:
        """The next size up (or down) within the range; None at its end."""
        other = max(self.lo, int(size / self.factor)) if down else min(self.hi, math.ceil(size * self.factor))
        return other if (other < size if down else other > size) else None

    def _move(self, size: int, reason: str, rate: float | None) -> Step:
        self.size = size
        self.epoch += 1
        self.changes += 1
        self._reset()
        return Step(size, reason, rate)

    def _hold(self, size: int | None, reason: str, rate: float | None) -> Step | None:
        self.settled = True
        if size is None or size == self.size:
            return None
        return self._move(size, reason, rate)

    def _reset(self) -> None:
        self._since: float | None = None
        self._warm = True
        self._rows = 0
        self._tokens = 0
