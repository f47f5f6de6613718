"""Training-free metrics computed from empirical NTKs (see :mod:`fastntk.metrics.kernel`)."""

from fastntk.metrics.kernel import *  # noqa: F403
from fastntk.metrics.kernel import REVISIONS, __all__, _check_errors, _ntk_kwargs  # noqa: F401
