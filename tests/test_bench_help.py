"""Every bench script runs from a fresh clone as its docstring says, with no PYTHONPATH.

The kit's .venv puts the checkout on sys.path (a .pth file), which would hide a script that
cannot find kit/ or models.py on its own. So the scripts run here under a virtualenv that has
the requirements and not that .pth: what someone has who cloned the kit and ran
`pip install -r requirements-test.txt` into a virtualenv of their own.
"""

import ast
import os
import site
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = sorted(path for path in (ROOT / "bench").glob("*.py")
                 if f"python bench/{path.name}" in (ast.get_docstring(ast.parse(
                     path.read_text())) or ""))


@pytest.fixture(scope="module")
def clone_python(tmp_path_factory):
    """A Python with the kit's requirements on its path, and not the checkout."""
    venv = tmp_path_factory.mktemp("clone") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(target, "requirements.pth"), "w") as pth:
        pth.write("\n".join(site.getsitepackages()) + "\n")  # paths only: no .pth run there
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([python, "-c", "import sqlalchemy, kit"], cwd=venv, env=env,
                           capture_output=True, text=True)  # -c puts the cwd on the path
    assert "No module named 'kit'" in probe.stderr, probe.stderr  # sqlalchemy yes, kit no
    return python, env


def test_the_bench_scripts_are_found():
    assert len(SCRIPTS) >= 12, [path.name for path in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.name for path in SCRIPTS])
def test_every_bench_script_shows_its_usage_from_a_fresh_clone(clone_python, script):
    python, env = clone_python
    done = subprocess.run([python, f"bench/{script.name}", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.startswith("usage:"), done.stdout[:300]
