"""The layout rule (README, Architecture): every core module is under the import-linter contract that keeps
adapters and entry points out of it, so a new core module cannot slip past `make lint`."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Adapters and entry points: the packages and modules the core must not import.
EDGES = {"aws", "http", "sagemaker", "demo", "cli"}


def core_contract() -> dict:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["name"].startswith("The core never imports"))


def test_given_the_package_when_listed_then_every_core_module_is_a_source_of_the_core_contract() -> None:
    package = ROOT / "clipsearch"
    found = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    found |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    core = {f"clipsearch.{name}" for name in found - EDGES}
    assert core <= set(core_contract()["source_modules"])


def test_given_the_core_contract_when_read_then_it_forbids_every_adapter_and_entry_point() -> None:
    assert {f"clipsearch.{name}" for name in EDGES} == set(core_contract()["forbidden_modules"])


def test_given_the_test_folders_when_listed_then_no_two_test_modules_share_a_name() -> None:
    # pytest imports test modules by basename (rootdir-relative, no packages): a second one fails collection.
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
