import os
import sys

import pytest
import torch

# The repository's root is not an import location: its top-level kernels/ folder (installed
# as fastntk.kernels) would shadow a third-party package named `kernels` (Hugging Face's,
# which transformers probes for). `python -m pytest` puts the working directory first on
# sys.path; the tests import fastntk from its install.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
sys.path.insert(0, os.path.dirname(__file__))

# The test models are tiny: one thread avoids OpenMP start-up and contention costs
# that dominate such small ops on a 2-core machine (measured: a 2x16x32x32 depthwise
# conv took 50 ms with 2 threads under load vs 0.5 ms with 1).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """CI's ``FASTNTK_REQUIRE_*`` variables: a compiled path whose tests would skip is an error.

    ``FASTNTK_REQUIRE_CSRC=1``: the C++ extension ``fastntk._C`` must load. Its tests
    (``test_csrc.py``, the engine's ``csrc`` and ``auto`` C++ paths) skip where it does not
    (an install without a compiler, ``FASTNTK_NO_EXT=1``); CI builds it, so there a skip
    would hide a broken build of the paths ``auto`` takes.

    ``FASTNTK_REQUIRE_TRITON=1``: a Triton kernel test that cannot run is an error. The
    kernel test modules skip themselves where Triton cannot run (a plain install without
    it); CI installs it, so there a skip would hide a broken check.
    """
    import pytest

    if os.environ.get("FASTNTK_REQUIRE_CSRC") == "1":
        from fastntk import _ext

        if not _ext.available():
            raise pytest.UsageError(
                f"FASTNTK_REQUIRE_CSRC=1 but the C++ extension cannot be used: {_ext.why_not()}"
            )
    if os.environ.get("FASTNTK_REQUIRE_TRITON") != "1":
        return
    from fastntk.kernels import why_not

    if os.environ.get("TRITON_INTERPRET") != "1":
        return  # no Triton test module was collected (they set TRITON_INTERPRET on import)
    reason = why_not("cpu")
    if reason is not None:
        raise pytest.UsageError(
            f"FASTNTK_REQUIRE_TRITON=1 but Triton's kernels cannot run: {reason}"
        )


@pytest.fixture
def tiny_nb201(monkeypatch):
    """The registry's NB201 swapped for a narrow one (C=4, N=1: same arch strings and
    ground truth, a ~40x cheaper network): the command-line tests."""
    from fastntk.spaces import registry
    from fastntk.spaces.nb201 import NB201Space

    monkeypatch.setitem(registry._SPACES, "nb201", lambda: NB201Space(C=4, N=1))
