"""The notebooks run top to bottom, offline: a tiny local pipeline and a 20-step training run.

``JDIT_NOTEBOOK_OFFLINE=1`` skips the install cell and points the quickstart at a small random
PixArt-Σ pipeline folder instead of the hub; the cells are otherwise those a Colab user runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from jdit.testing import tiny_pipelines

ROOT = Path(__file__).resolve().parents[1]


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    old = dict(os.environ)
    os.environ.update({"JDIT_NOTEBOOK_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **env})
    try:  # the kernel inherits this process's environment
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def outputs(nb: nbformat.NotebookNode, kind: str) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if kind in o.get("data", {})]


@pytest.mark.slow
def test_quickstart_notebook(tmp_path):
    tiny_pipelines.text_to_image(tmp_path / "pipe")
    nb = execute("quickstart", {"JDIT_NOTEBOOK_PIPELINE": str(tmp_path / "pipe")})
    assert len(outputs(nb, "image/png")) >= 4  # the grid, one per solver, the PIL image


@pytest.mark.slow
def test_train_shapes_notebook(tmp_path):
    nb = execute("train_shapes", {"JDIT_NOTEBOOK_STEPS": "20",
                                  "JDIT_NOTEBOOK_WORKDIR": str(tmp_path / "run")})
    assert (tmp_path / "run" / "grid.png").exists()
    assert len(outputs(nb, "image/png")) >= 2  # the loss curve and the samples
    assert "adherence_single" in str(nb.cells[-1].outputs)
