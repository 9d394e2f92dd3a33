"""``import trafficthreshold`` from a source tree without the built
extension (the checkout root after ``pip install .``) says what is happening
and what to do, instead of Python's circular-import message."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: -S: no site-packages, so no installed copy (an editable install of
#: another checkout maps trafficthreshold._counter to its own .so) can
#: supply the extension; the package needs only the standard library up to
#: that import.  The current directory comes first on sys.path, as for a user.
PYTHON = [sys.executable, "-S", "-c"]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_source_tree_without_extension_names_the_fix(tmp_path):
    tree = tmp_path / "checkout"
    shutil.copytree(ROOT / "trafficthreshold", tree / "trafficthreshold",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    assert not list((tree / "trafficthreshold").glob("*.so"))
    done = subprocess.run(PYTHON + ["import trafficthreshold"], cwd=tree,
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: you are importing the source tree at "
                           f"{tree / 'trafficthreshold'}"), done.stderr
    for fix in ("cd elsewhere", "pip install -e .", "python setup.py build_ext --inplace"):
        assert fix in last
    assert "circular import" not in last.split("(Python said")[0]


def test_built_tree_imports(tmp_path):
    """The same copy with the extension in place imports (the check above
    is about the missing .so, nothing else)."""
    tree = tmp_path / "checkout"
    shutil.copytree(ROOT / "trafficthreshold", tree / "trafficthreshold",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(PYTHON + ["import trafficthreshold; print(trafficthreshold.__file__)"],
                          cwd=tree, env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tree / "trafficthreshold" / "__init__.py")


def test_the_package_exports_the_bound_on_n() -> None:
    import trafficthreshold
    from trafficthreshold import segment
    assert trafficthreshold.MAX_HIT_N == segment.MAX_HIT_N == 2**32 - 1
    assert "MAX_HIT_N" in trafficthreshold.__all__
