"""The wheel users install: license, typing marker, extras and classifiers (issue 11, point 9)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_its_license_typing_marker_and_extras(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "--no-deps", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("maintgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        license_text = next(archive.read(n).decode() for n in names if n.endswith("licenses/LICENSE"))
    assert "maintgate/py.typed" in names
    assert "MIT License" in license_text and license_text == (ROOT / "LICENSE").read_text()
    assert "License-Expression: MIT" in metadata
    assert "Provides-Extra: django" in metadata and "Provides-Extra: postgres" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
