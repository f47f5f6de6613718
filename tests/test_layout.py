"""The repository's layout does not leak into the import namespace of the tests."""

from __future__ import annotations

import importlib
import os
import sys


def test_a_third_party_kernels_package_is_not_shadowed(tmp_path, monkeypatch):
    """The top-level kernels/ folder is fastntk.kernels, not `kernels`: a package of that
    name installed elsewhere (Hugging Face's, which transformers imports) is the one found,
    also when the tests run from the repository's root."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'third-party'\n")
    # appended, as site-packages is: after every other entry
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    mod = importlib.import_module("kernels")
    try:  # the one above, or one installed in site-packages (transformers installs it)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        found = os.path.dirname(os.path.abspath(mod.__file__))
        assert found != os.path.join(repo, "kernels"), mod.__file__
    finally:
        sys.modules.pop("kernels", None)
    import fastntk.kernels

    assert hasattr(fastntk.kernels, "why_not")  # fastntk's own kernels stay reachable
