"""tutorial.ipynb: its sections and outputs are committed, and it runs top to bottom on a CPU within
its time budget.
"""
import time

import pytest

from helpers import REAL_DATA, ROOT


SECTIONS = ["## 1. The 280-character model", "## 2. The patch embedding", "## 3. Spatial mixing",
            "## 4. Channel mixing", "## 5. Isotropy", "## 6. BatchNorm, GELU",
            "## 7. ConvMixer, ViT and MLP-Mixer", "## 8. A short training run", "## 9. Why ConvMixer is slow"]


def count_figures(notebook):
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def test_committed_tutorial_has_all_sections_and_its_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    for section in SECTIONS:
        assert section in text, section
    assert all(cell.outputs for cell in notebook.cells if cell.cell_type == "code")
    assert count_figures(notebook) >= 4


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None, reason="the notebook trains on the real CIFAR-10 (set CIFAR10_ROOT or "
                    "put it in ./data); without it, only its committed outputs are checked")
def test_tutorial_executes_within_five_minutes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    start = time.time()
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()   # raises on error
    assert time.time() - start < 300
    assert count_figures(notebook) >= 4
