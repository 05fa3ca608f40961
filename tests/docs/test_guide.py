"""The user guide documents every option, with its current default."""

from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from lossguard.config import DetectionConfig, GpuConfig, ProbeConfig, RecoveryConfig

GUIDE = (Path(__file__).resolve().parents[2] / "docs" / "guide.md").read_text()


def _section(name: str) -> str:
    start = GUIDE.index(f"### {name}\n")
    end = GUIDE.find("\n### ", start + 1)
    end = GUIDE.find("\n## ", start + 1) if end == -1 else min(end, GUIDE.find("\n## ", start + 1))
    return GUIDE[start:end]


@pytest.mark.parametrize("name,cls", [("detection", DetectionConfig), ("recovery", RecoveryConfig),
                                      ("probe", ProbeConfig), ("gpu", GpuConfig)])
def test_every_option_is_in_the_guide_with_its_default(name, cls):
    table = _section(name)
    for f in fields(cls):
        rows = [line for line in table.splitlines() if line.startswith(f"| `{f.name}` |")]
        assert rows, f"{name}.{f.name} is not documented in docs/guide.md"
        if f.default is not MISSING and not isinstance(f.default, tuple):
            cell = rows[0].split("|")[2].strip().strip('"')
            default = f.default
            if isinstance(default, float) and not isinstance(default, bool):
                assert float(cell) == pytest.approx(default), f"{name}.{f.name}: guide says {cell}"
            else:
                assert cell == str(default), f"{name}.{f.name}: guide says {cell}, code has {default}"
