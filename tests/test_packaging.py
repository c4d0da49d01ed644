"""The wheel users install: license, typing marker, extras and classifiers (issue 11, point 9)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
    assert "Classifier: Typing :: Typed" in metadata and "Classifier: Framework :: Django" in metadata
    assert "Project-URL: Homepage, https://pypi.org/project/maintgate/" in metadata
    assert "Project-URL: Documentation, " in metadata
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_the_sdist_ships_the_tests_with_everything_they_need_and_the_linked_documents(tmp_path):
    import re
    import tarfile

    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (sdist,) = tmp_path.glob("maintgate-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
        names = {name.partition("/")[2] for name in archive.getnames()}
    linked = set(re.findall(r"\]\(([\w./-]+\.md)\)", (ROOT / "README.md").read_text()))
    assert linked and linked <= names, f"documents the README links: {sorted(linked - names)} missing"
    tracked = subprocess.run(
        ["git", "ls-files", "tests", "examples", "benchmarks"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout (an unpacked sdist, say): nothing to compare the sdist with")
    assert set(tracked) <= names, f"not shipped: {sorted(set(tracked) - names)[:10]}"
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".db"))]

    unpacked = next(p for p in tmp_path.iterdir() if p.is_dir())

    def python(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, *args]
        return subprocess.run(command, cwd=unpacked, capture_output=True, text=True, timeout=300)

    collected = python("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    where = python("-c", "import maintgate; print(maintgate.__file__)").stdout
    assert str(unpacked / "maintgate") in where, "the tests run against the unpacked sources"
    quick = python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_negotiation.py")
    assert quick.returncode == 0, quick.stdout[-2000:]
