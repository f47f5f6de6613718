"""The protocol every fastntk search space implements.

A search space is a set of architectures with a canonical, hashable string
encoding. Search algorithms only ever talk to a space through these methods,
so users and other libraries can plug in their own space by implementing
them (structural typing: no need to inherit from :class:`SearchSpace`).
"""

from __future__ import annotations

import random
from typing import Any, Protocol, runtime_checkable

import torch.nn as nn

from fastntk._args import integer, is_int
from fastntk.errors import ArchitectureError


@runtime_checkable
class SearchSpace(Protocol):
    """Protocol of a search space.

    Attributes:
        name: short identifier used on the command line and in the journal
            (``"nb201"``, ``"darts"``, ...).
    """

    name: str

    def sample(self, rng: random.Random) -> Any:
        """Draw one architecture uniformly (or from the space's natural prior)."""
        ...

    def mutate(self, arch: Any, rng: random.Random) -> Any:
        """Return a neighbour of ``arch`` in the space, one change away (one decision; in
        DARTS one (op, input) pair, which can reorder its node's canonical pair)."""
        ...

    def build(self, arch: Any, num_classes: int = 10) -> nn.Module:
        """Instantiate the network of ``arch`` (untrained, default initialisation)."""
        ...

    def encode(self, arch: Any) -> str:
        """The canonical string of ``arch`` (stable across runs; used as the journal key)."""
        ...

    def decode(self, s: str) -> Any:
        """Inverse of :meth:`encode`; raises :class:`fastntk.errors.ArchitectureError` on bad input."""
        ...


def positive_int(name: str, v: Any, minimum: int = 1) -> int:
    """``v`` as an int >= ``minimum`` (numpy integers too); OptionError otherwise."""
    return integer(v, name, lo=minimum)


def exact_ints(values: Any, what: str) -> tuple[int, ...]:
    """``values`` as ints, refusing floats, strings and bools (6.9 is not taken for 6)."""
    try:
        items = tuple(values)
    except TypeError:
        raise ArchitectureError(f"{what}, got {values!r}") from None
    if not all(is_int(v) for v in items):
        raise ArchitectureError(f"{what} (integers), got {values!r}")
    return tuple(int(v.__index__()) for v in items)


class ChoiceSpace:
    """``sample`` and ``mutate`` for a space given as independent categorical decisions.

    A subclass defines ``decisions()`` (``[(name, allowed values), ...]``),
    ``to_choices(arch)`` and ``from_choices(values)``; every combination of allowed values
    must be an architecture. ``sample`` draws each decision uniformly (one
    ``rng.randrange`` each, in order); ``mutate`` changes one decision, drawn uniformly,
    to another of its values, drawn uniformly.
    """

    def sample(self, rng: random.Random) -> Any:
        return self.from_choices([ch[rng.randrange(len(ch))] for _, ch in self.decisions()])

    def mutate(self, arch: Any, rng: random.Random) -> Any:
        c = list(self.to_choices(arch))
        decisions = self.decisions()
        d = rng.randrange(len(c))
        c[d] = rng.choice([v for v in decisions[d][1] if v != c[d]])
        return self.from_choices(c)
