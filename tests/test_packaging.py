"""Installed = checkout: every runtime file ships in the wheel as package data and is read through
importlib.resources, never through a path built from ``__file__``. (scripts/check_wheel.sh, run by CI,
installs the wheel into a fresh venv and runs it from outside the source tree.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mvtec_caption", "axf_pipeline")


def _package_files() -> list[str]:
    return sorted(
        p.relative_to(REPO).as_posix()
        for package in PACKAGES
        for p in (REPO / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> set[str]:
    """The names inside a wheel built from a copy of the sources (no stale build/ of the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(root / "dist")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = (root / "dist").glob("*.whl")
    return set(zipfile.ZipFile(built).namelist())


def test_every_file_of_the_packages_is_in_the_wheel(wheel):
    files = _package_files()
    assert {"mvtec_caption/cards/dataset_card.md", "axf_pipeline/cards/model_card.md",
            "axf_pipeline/cards/synthetic_dataset_card.md", "mvtec_caption/data/ad_captions.json"} <= set(files)  # fmt: skip
    missing = [f for f in files if f not in wheel]
    assert not missing, f"runtime files left out of the wheel (pyproject.toml package-data): {missing}"


def test_no_module_reads_files_next_to_its_source():
    """A path from ``__file__`` works in a checkout and breaks once installed (or points outside the package):
    runtime files are read with importlib.resources."""
    offenders = [
        f"{path}:{n}"
        for path in _package_files()
        if path.endswith(".py")
        for n, line in enumerate((REPO / path).read_text().splitlines(), 1)
        if re.search(r"\b__file__\b", line)
    ]
    assert not offenders, offenders


def test_the_card_templates_are_read_as_package_data():
    from mvtec_caption.cards import card_template

    assert "{{ card_data }}" in card_template("mvtec_caption", "dataset_card.md")
    assert "{{ card_data }}" in card_template("axf_pipeline", "model_card.md")
    with pytest.raises(FileNotFoundError, match="axf_pipeline/cards/nothing.md is missing"):
        card_template("axf_pipeline", "nothing.md")
    assert not (REPO / "cards").exists(), "card templates belong inside the packages"
