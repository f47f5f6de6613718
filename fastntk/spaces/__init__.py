"""Search spaces of fastntk (NAS-Bench-201, DARTS, ResNet, ViT).

Each space implements :class:`fastntk.spaces.base.SearchSpace`.
"""

from fastntk.spaces import nb201
from fastntk.spaces.base import SearchSpace
from fastntk.spaces.nb201 import NB201Space

__all__ = ["NB201Space", "SearchSpace", "nb201"]
