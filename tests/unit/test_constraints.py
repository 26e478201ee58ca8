"""The lock: constraints.txt pins every dependency pyproject.toml names, at a version that satisfies it,
so a fresh clone's `make install` gets what CI tested. A dependency added without `make lock` fails here.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import clipsearch

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def pins(text: str) -> dict[str, Version]:
    """name -> version of each `name==version` line; comments and blank lines aside, nothing else may appear."""
    found: dict[str, Version] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        assert match, f"constraints.txt line is not name==version: {line!r}"
        found[canonicalize_name(match.group(1))] = Version(match.group(2))
    return found


def declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    return [
        Requirement(r)
        for r in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    ]


def unpinned(requirements: list[Requirement], locked: dict[str, Version]) -> list[str]:
    """Each requirement with no pin, or whose pin it does not accept."""
    wrong = []
    for req in requirements:
        pin = locked.get(canonicalize_name(req.name))
        if pin is None:
            wrong.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pin, prereleases=True):
            wrong.append(f"{req.name} is pinned at {pin}, outside {req.specifier}")
    return wrong


def test_given_the_lock_when_compared_with_pyproject_then_every_dependency_is_pinned_within_its_range() -> None:
    locked = pins((ROOT / "constraints.txt").read_text(encoding="utf-8"))
    assert unpinned(declared(), locked) == [], "run `make lock` after changing dependencies in pyproject.toml"
    assert "clipsearch" not in locked  # the project itself is installed from the clone, not pinned


@pytest.mark.parametrize(
    "requirement,lock,problem",
    [
        ("uvicorn>=0.30", "numpy==2.2.6\n", "uvicorn is not pinned"),
        ("numpy>=3", "numpy==2.2.6\n", "numpy is pinned at 2.2.6, outside >=3"),
        ("Pillow_HEIF>=1.0", "pillow-heif==1.0.0\n", None),  # names compare as pip does
        ("moto[server]>=5.0", "# header\n\nmoto==5.1.0\n", None),
    ],
)
def test_given_a_requirement_when_checked_against_a_lock_then_a_missing_or_outdated_pin_is_named(
    requirement: str, lock: str, problem: str | None
) -> None:
    assert unpinned([Requirement(requirement)], pins(lock)) == ([problem] if problem else [])


def test_given_the_version_when_read_then_it_is_written_only_in_the_package() -> None:
    # pyproject.toml takes it from clipsearch.__version__; the API document states the same.
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "clipsearch.__version__"}
    assert Version(clipsearch.__version__)
    for doc in (ROOT / "docs" / "openapi.json", ROOT / "clipsearch" / "http" / "web" / "openapi.json"):
        assert json.loads(doc.read_text(encoding="utf-8"))["info"]["version"] == clipsearch.__version__, doc
