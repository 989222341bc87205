"""The project's own rules: the two ways to install agree, notebooks are committed clean, the README shows the way
in."""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# conda-forge names that differ from PyPI's.
CONDA_TO_PYPI = {"pytorch": "torch"}


def package_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_names_the_same_packages_as_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    wanted = {package_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}

    conda = set()
    text = (ROOT / "environment.yml").read_text()
    for line in text.split("dependencies:", 1)[1].splitlines():
        # a conda dependency, or one of the pip list's (those conda-forge lacks in a recent enough version)
        match = re.match(r"^  - ([A-Za-z0-9_.\-]+)", line) or \
            re.match(r"^      - ([A-Za-z0-9_.][A-Za-z0-9_.\-]*)", line)
        if match and match.group(1) not in ("python", "pip"):
            name = package_name(match.group(1))
            conda.add(CONDA_TO_PYPI.get(name, name))
    assert conda == wanted
    assert '-e ".[dev]"' in text  # the project itself, editable


def test_notebooks_exist_in_order():
    names = [p.name for p in NOTEBOOKS]
    assert names, "no notebooks found"
    numbers = [int(n[:2]) for n in names]
    assert numbers == list(range(len(names))), f"notebooks are not numbered 00, 01, ... without gaps: {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    dirty = [i for i, cell in enumerate(notebook["cells"])
             if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))]
    assert dirty == [], f"{path.name}: cells {dirty} hold outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_the_package_and_checks_itself(path):
    """Each notebook imports the canonical code from vit_helpers and proves its claims with asserts."""
    notebook = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert re.search(r"^\s*(from vit_helpers|import vit_helpers)", code, re.MULTILINE), path.name
    assert re.search(r"^\s*assert ", code, re.MULTILINE), path.name
    hidden_solutions = [c for c in notebook["cells"]
                        if c["cell_type"] == "code" and c.get("metadata", {}).get("jupyter", {}).get("source_hidden")]
    assert hidden_solutions, f"{path.name}: no exercise solution cell (hidden by default)"


def test_readme_shows_the_two_commands_and_ci_runs_the_tests():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("offset", ["0", "3"])
def test_the_shifted_seeds_audit_shifts_torch_manual_seed(offset):
    """scripts/shifted_seeds (BENCHMARKS.md, "Under the device's PyTorch"): with SEED_OFFSET=k, a process started
    with it on PYTHONPATH draws from seed s + k where it asks for s; with 0, from s itself."""
    program = ("import torch; torch.manual_seed(0); shifted = torch.rand(3); torch.random.manual_seed(0); "
               "again = torch.rand(3); g = torch.Generator().manual_seed(0); print(shifted.tolist(), again.tolist(), "
               "torch.rand(3, generator=g).tolist())")
    env = {**os.environ, "SEED_OFFSET": offset, "PYTHONPATH": str(ROOT / "scripts" / "shifted_seeds")}
    output = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(int(offset))).tolist()
    unshifted = torch.rand(3, generator=torch.Generator().manual_seed(0)).tolist()
    assert output.stdout.strip() == f"{expected} {expected} {unshifted}"  # the global seed moves, a Generator's not
