"""The README tells a user how to put lossguard into their own environment, and that recipe works."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _own_environment() -> str:
    start = README.index("### In your own environment")
    return README[start:README.index("\n## ", start)]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0]


def test_the_readme_says_how_to_install_the_package_and_names_the_real_extras():
    text = _own_environment()
    assert "pip install /path/to/lossguard" in text and 'pip install -e "/path/to/lossguard[dev]"' in text
    extras = set(re.findall(r"`\[(\w+)\]`", text))
    assert extras == set(PROJECT["optional-dependencies"])
    for extra, packages in PROJECT["optional-dependencies"].items():
        for p in packages:
            assert f"`{_name(p)}`" in text, f"{extra} extra: {_name(p)} not named in the README"
    runtime = {_name(p) for p in PROJECT["dependencies"]} - {"torch", "numpy", "typer", "safetensors", "tokenizers",
                                                            "orjson"}
    for p in runtime:
        assert f"`{p}`" in text, f"runtime dependency {p} not named in the README"


@pytest.mark.slow
def test_the_package_builds_from_its_path_with_the_command_and_type_marker(tmp_path):
    """What ``pip install /path/to/lossguard`` does first: build a wheel from the source tree."""
    src = tmp_path / "lossguard-src"  # a copy: setuptools builds in the tree it is given
    shutil.copytree(ROOT / "lossguard", src / "lossguard", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("lossguard-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "lossguard = lossguard.cli:main" in z.read(entry).decode()
    assert {"lossguard/py.typed", "lossguard/status.py", "lossguard/cli/commands.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
