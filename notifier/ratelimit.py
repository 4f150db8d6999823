"""A token bucket: ``rate`` tokens a second, holding at most ``burst``."""

from __future__ import annotations

import time


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float | None = None):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic() if now is None else now

    def take(self, count: int = 1, now: float | None = None) -> bool:
        """Spend ``count`` tokens if at least one is there. A large spend may
        go into debt, so a batch bigger than the burst is possible but
        delays what follows by as long as its size demands."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= count
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until one token is available."""
        return max(0.0, (1 - self.tokens) / self.rate)
