"""tutorial.ipynb: its sections and outputs are committed, every comparison of accuracies carries
mean +- sd over 3 seeds, the figures it states about itself are its own outputs, and it runs top to
bottom on a CPU (with the real CIFAR-10, which it trains on); the running time it states is the one
its committed run printed, within its budget (no test times a run here: the machine may be busy).
"""
import re

import pytest

from helpers import REAL_DATA, ROOT

SECTIONS = ["## 1. The 280-character model", "## 2. The patch embedding", "## 3. Spatial mixing",
            "### The kernel size", "## 4. Channel mixing", "## 5. No position embedding", "## 6. Isotropy",
            "## 7. BatchNorm, GELU", "## 8. ConvMixer, ViT and MLP-Mixer", "## 9. The trained model at work",
            "## 10. Why ConvMixer is slow"]
ABLATION = ["none (paper)", "BatchNorm -> LayerNorm", "GELU -> ReLU", "no residual",
            "residual around the whole block", "kernel 5 -> 3", "kernel 5 -> 9"]
CONTENDERS = ["ConvMixer-48/4 (k5, p4)", "ViT (dim 24, depth 2, p4)", "MLP-Mixer (dim 32, depth 1, p4)",
              "ConvMixer-24/4 (k5, p2)"]
BUDGET_SECONDS = 240                    # 4 minutes on 2 CPU cores


def count_figures(notebook):
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def printed(notebook):
    return "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.outputs if output.get("output_type") == "stream")


def check_outputs(notebook):
    """What the notebook's text relies on is in its outputs: 3 seeds and their mean +- sd for every
    accuracy it compares, the image sizes ConvMixer takes and ViT and MLP-Mixer do not, the trained
    model's classes, and its own running time, which its first cell states."""
    out = printed(notebook)
    for name in ABLATION + CONTENDERS:
        row = re.search(re.escape(name) + r".*?(\d+\.\d) \+- (\d+\.\d)%.*?\((?:seeds: )?([\d., ]+)\)", out)
        assert row, name
        seeds = [float(a) for a in row.group(3).split(", ")]
        assert len(seeds) == 3 and abs(sum(seeds) / 3 - float(row.group(1))) <= 0.1, (name, row.group(0))
    assert "48 x 48 (144 patches): ConvMixer (2, 10), ViT fails, MLP-Mixer fails" in out
    assert all(c in out for c in ("airplane", "truck"))                  # the per-class accuracies
    seconds = int(re.search(r"this notebook, top to bottom: (\d+) s", out).group(1))
    intro = notebook.cells[0].source
    assert f"it ran in {seconds} s on 2 CPU cores" in intro.replace("\n", " ")
    assert seconds <= BUDGET_SECONDS
    assert count_figures(notebook) >= 6


def test_committed_tutorial_has_all_sections_and_its_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    for section in SECTIONS:
        assert section in text, section
    assert all(cell.outputs for cell in notebook.cells if cell.cell_type == "code")
    check_outputs(notebook)


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None, reason="the notebook trains on the real CIFAR-10 (set CIFAR10_ROOT or "
                    "put it in ./data); without it, only its committed outputs are checked")
def test_tutorial_executes_within_its_budget():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()   # raises on error
    out = printed(notebook)
    assert all(name in out for name in ABLATION + CONTENDERS)
    assert count_figures(notebook) >= 6
