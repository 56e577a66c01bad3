"""The notebooks' contract with CI (nbmake executes them; see setup.cfg): checked without a kernel.

Each notebook has exactly one cell tagged ``parameters`` (papermill style) whose ``max_steps``
is small, uses paths relative to ``notebooks/`` only, and is stored without outputs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_samplers_and_modes.ipynb", "03_your_data.ipynb"]


def test_the_three_notebooks_exist() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_is_small_and_paths_are_relative(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    values = {}
    for node in ast.parse(params[0].source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            values.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    assert 1 <= values["max_steps"] <= 10
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"[\"'](/|[A-Za-z]:\\)", code), "absolute path in a notebook"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    assert nb.metadata.kernelspec.name == "python3"


def test_your_data_defaults_to_the_shared_brain_pair() -> None:
    nb = nbformat.read(NOTEBOOKS / "03_your_data.ipynb", as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert 'data_dir = "../../shared/data/brain-pair/2mm"' in params.source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "NIRCLI(args, run=False)" in code and "write_demo_pair" in code  # configs drive it; phantom fallback
