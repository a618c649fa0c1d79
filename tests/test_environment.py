"""The install is what the project declares: every import declared, every declared package pinned, and the suite
run by `make test` / CI from the project's own virtual environment rather than whatever the machine has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _deptry(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deptry", "."], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1"}, timeout=300)


def _declared_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["dev"]]


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_every_third_party_import_is_declared() -> None:
    result = _deptry(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dependency_check_catches_an_undeclared_import(tmp_path: Path) -> None:
    """The bug CI once missed: rouge_score imported by Self-Instruct but not declared."""
    shutil.copytree(REPO / "unifit", tmp_path / "unifit", ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"rouge-score' in pyproject
    (tmp_path / "pyproject.toml").write_text(re.sub(r'\n\s*"rouge-score[^\n]*', "", pyproject))
    result = _deptry(tmp_path)
    report = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    assert result.returncode != 0 and "self_instruct.py" in report and "'rouge_score' imported but" in report, report


def test_constraints_pin_every_declared_package_within_its_range() -> None:
    """A dependency added to pyproject.toml without `make lock` would install unpinned on cluster nodes."""
    pins = _constraints()
    for requirement in _declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is declared but not pinned in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside the declared {requirement}: run `make lock`")
    assert pins["torch"] == "2.13.0", "torch is pinned without a +cpu tag so GPU nodes take the CUDA build"


@pytest.fixture
def project_venv() -> Path:
    """The venv `make test` says it runs from; CI must always say (its `.ci/run` goes through `make test`)."""
    venv = os.environ.get("UNIFIT_VENV")
    if not venv:
        if os.environ.get("CI"):
            pytest.fail("CI must run the suite through `make test`, from the project's own venv (UNIFIT_VENV unset)")
        pytest.skip("not run through `make test`: this environment is the user's own")
    return Path(venv).resolve()


def test_the_suite_runs_from_the_projects_own_venv(project_venv: Path) -> None:
    assert Path(sys.prefix).resolve() == project_venv, f"interpreter {sys.executable} is not {project_venv}'s"
    assert sys.prefix != sys.base_prefix, "not a virtual environment"
    config = (project_venv / "pyvenv.cfg").read_text()
    assert re.search(r"include-system-site-packages\s*=\s*false", config), "the venv sees the machine's packages"
    base = Path(sys.base_prefix).resolve()
    leaked = [p for p in sys.path if p and "site-packages" in p and Path(p).resolve().is_relative_to(base)]
    assert not leaked, f"the machine's site-packages are on sys.path: {leaked}"


def test_installed_versions_are_the_constrained_ones(project_venv: Path) -> None:
    mismatched = {}
    for name, pinned in _constraints().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed.split("+")[0] != pinned:
            mismatched[name] = (pinned, installed)
    assert not mismatched, f"installed versions differ from constraints.txt (pinned, installed): {mismatched}"
