"""A bounded exponential back-off with jitter, for loops that must never spin."""

from __future__ import annotations

import random


class Backoff:
    """Delays of base, 2*base, 4*base ... capped at `cap`, each with ±20 % jitter."""

    def __init__(self, base: float = 0.5, cap: float = 10.0, rng: random.Random | None = None):
        self.base, self.cap = base, cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.failures))
        self.failures += 1
        return delay * self._rng.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.failures = 0
