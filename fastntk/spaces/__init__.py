"""Search spaces of fastntk (NAS-Bench-201, DARTS, ResNet, ViT).

Each space implements :class:`fastntk.spaces.base.SearchSpace`;
:func:`get_space` looks one up by name (``"nb201"``, ``"darts"``, ``"resnet"``,
``"vit"``), :func:`register_space` adds your own.
"""

from fastntk.spaces import nb201
from fastntk.spaces.base import SearchSpace
from fastntk.spaces.nb201 import NB201Space
from fastntk.spaces.registry import get_space, register_space, space_names

__all__ = ["NB201Space", "SearchSpace", "get_space", "nb201", "register_space", "space_names"]
