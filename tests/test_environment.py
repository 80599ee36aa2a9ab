"""The conda environments pin exactly what pyproject.toml declares.

pyproject.toml is the one list of dependencies; environment.yml (cluster users: the package, the
workflow and the tests) and workflow/envs/noisynn.yaml (every job under `snakemake --sdm conda`:
the package's runtime only) repeat it for conda. These tests fail as soon as one of the copies
drifts: a pin bumped in one file only, a dependency added or dropped on one side.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
ENVIRONMENT = REPO / "environment.yml"
WORKFLOW_ENV = REPO / "workflow" / "envs" / "noisynn.yaml"
EXTRAS = ("workflow", "test")  # what `make venv` installs besides the package: `.[workflow,test]`
PROJECT_ITSELF = {"--editable .", "-e .", "."}


def pins(requirements: list[str], source: Path) -> dict[str, SpecifierSet]:
    """Canonical name → specifier of PEP 508 requirement strings; a name listed twice is an error."""
    out: dict[str, SpecifierSet] = {}
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name not in out, f"{source.name} lists {req.name} twice"
        out[name] = req.specifier
    return out


def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def runtime_pins() -> dict[str, SpecifierSet]:
    return pins(pyproject()["dependencies"], PYPROJECT)


def declared_pins() -> dict[str, SpecifierSet]:
    """The runtime dependencies and the extras the development environment installs."""
    project = pyproject()
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    return pins(requirements, PYPROJECT)


def conda_env(path: Path) -> tuple[list[str], list[str]]:
    """(conda dependencies, pip requirements) of a conda environment file."""
    env = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
        else:
            conda.append(dep)
    return conda, pip


def pip_pins(path: Path) -> dict[str, SpecifierSet]:
    _, pip = conda_env(path)
    return pins([r for r in pip if r not in PROJECT_ITSELF], path)


def as_text(p: dict[str, SpecifierSet]) -> dict[str, str]:
    return {name: str(spec) for name, spec in sorted(p.items())}


def test_environment_yml_pins_every_declared_requirement_as_pyproject_does():
    assert as_text(pip_pins(ENVIRONMENT)) == as_text(declared_pins())


def test_environment_yml_installs_the_project_itself():
    _, pip = conda_env(ENVIRONMENT)
    assert PROJECT_ITSELF & set(pip), "environment.yml must install the package (`--editable .`) for the noisynn CLI"


def test_workflow_env_pins_the_runtime_requirements_as_pyproject_does():
    assert as_text(pip_pins(WORKFLOW_ENV)) == as_text(runtime_pins())


@pytest.mark.parametrize("path", [ENVIRONMENT, WORKFLOW_ENV], ids=lambda p: p.name)
def test_conda_python_satisfies_requires_python(path):
    conda, _ = conda_env(path)
    pythons = [d for d in conda if d.split("=")[0].strip() == "python"]
    assert len(pythons) == 1, f"{path.name} must pin python once"
    version = pythons[0].split("=", 1)[1].lstrip("=")
    requires = SpecifierSet(pyproject()["requires-python"])
    assert requires.contains(version), f"{path.name} pins python {version}; pyproject.toml requires {requires}"


@pytest.mark.parametrize("path", [ENVIRONMENT, WORKFLOW_ENV], ids=lambda p: p.name)
def test_no_package_comes_from_both_conda_and_pip(path):
    conda, _ = conda_env(path)
    from_conda = {canonicalize_name(d.split("=")[0].split("<")[0].split(">")[0].strip()) for d in conda}
    assert not from_conda & set(pip_pins(path)), f"{path.name} installs a package through conda and pip"
