"""A tiny categorical search space and NTK-free scorers for the search tests."""

from __future__ import annotations

import random

from fastntk.errors import ArchitectureError


class ToySpace:
    """Strings of ``D`` letters from ``OPTS``; every letter position is one decision."""

    name = "toy"

    def __init__(self, D: int = 6, opts: str = "abcde"):
        self.D, self.opts = D, opts

    def decisions(self):
        return [(f"e{i}", tuple(self.opts)) for i in range(self.D)]

    def to_choices(self, a):
        return tuple(a)

    def from_choices(self, c):
        return "".join(c)

    def sample(self, rng: random.Random) -> str:
        return "".join(self.opts[rng.randrange(len(self.opts))] for _ in range(self.D))

    def mutate(self, a: str, rng: random.Random) -> str:
        i = rng.randrange(self.D)
        new = rng.choice([o for o in self.opts if o != a[i]])
        return a[:i] + new + a[i + 1 :]

    def build(self, a, num_classes=10):
        raise NotImplementedError

    def encode(self, a: str) -> str:
        return self.decode(a)

    def decode(self, s: str) -> str:
        if not isinstance(s, str) or len(s) != self.D or any(c not in self.opts for c in s):
            raise ArchitectureError(f"bad toy arch {s!r}")
        return s


def objective(a: str) -> float:
    """Additive toy objective: 'e' is the best letter everywhere, 'a' the worst."""
    return float(sum("abcde".index(c) for c in a)) + 0.01 * a.count("d")


def toy_metrics(a: str) -> dict[str, float]:
    return {"good": objective(a), "bad": float(a.count("a")), "neg": -objective(a)}


DIRECTIONS = {"good": True, "bad": False, "neg": False}
