"""tutorial.ipynb: its sections and outputs are committed; every accuracy it compares carries its 3
seeds, mean +- sd, and, against the paper's design, a Welch 95% interval and a verdict that follow from
those seeds; its baseline reaches 45%; the figures it states about itself are its own outputs; and it
runs top to bottom on a CPU (with the real CIFAR-10, which it trains on; here on a fraction of it).
The running time it states is the one its committed run printed, within its budget (no test times a
run here: the machine may be busy).
"""
import math
import re

import pytest

from helpers import REAL_DATA, ROOT

SECTIONS = ["## 1. The 280-character model", "## 2. The patch embedding", "## 3. Spatial mixing",
            "### The kernel size", "## 4. Channel mixing", "## 5. No position embedding", "## 6. Isotropy",
            "## 7. BatchNorm, GELU", "### The title question", "## 8. ConvMixer, ViT and MLP-Mixer",
            "## 9. The trained model at work", "## 10. Why ConvMixer is slow"]
BASELINE = "none (paper)"
COMPARED = ["BatchNorm -> LayerNorm", "BatchNorm before GELU", "GELU -> ReLU",
            "residual around the whole block", "4x MLP channel mixing", "ConvMixer-24/4 (k5, p2)",
            "ConvMixer-96/4 (k5, p8)", "ViT (dim 18, depth 4, p4)", "MLP-Mixer (dim 16, depth 4, p4)"]
BUDGET_SECONDS = 300                    # 5 minutes on 2 CPU cores
ROW = r"(\d+\.\d) \+- (\d+\.\d)%  \(seeds: ([\d., ]+)\)"
DIFFERENCE = r"  ([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\]  (supported|no difference shown)"


def welch_interval(a, b, t_quantile):
    """Welch's 95% interval for mean(a) - mean(b), given the t quantile function."""
    var = lambda x: sum((v - sum(x) / len(x)) ** 2 for v in x) / (len(x) - 1)
    va, vb = var(a) / len(a), var(b) / len(b)
    d = sum(a) / len(a) - sum(b) / len(b)
    if va + vb == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    return d, d - half, d + half


def count_figures(notebook):
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def printed(notebook):
    return "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.outputs if output.get("output_type") == "stream")


def check_rows(out):
    """Each compared accuracy's row: 3 seeds and their mean +- sd, and against the paper's design the
    difference with the Welch interval and verdict those seeds give. Returns the seeds by name."""
    seeds = {}
    for name in [BASELINE] + COMPARED:
        row = re.search(re.escape(name) + r" .*?" + ROW + (DIFFERENCE if name != BASELINE else ""), out)
        assert row, name
        seeds[name] = [float(a) for a in row.group(3).split(", ")]
        assert len(seeds[name]) == 3 and abs(sum(seeds[name]) / 3 - float(row.group(1))) <= 0.1, row.group(0)
        if name != BASELINE:
            d, low, high = welch_interval(seeds[name], seeds[BASELINE], t_quantile)
            printed_d, printed_low, printed_high = (float(row.group(g)) for g in (4, 5, 6))
            assert abs(d - printed_d) <= 0.1 and abs(low - printed_low) <= 0.15 and abs(high - printed_high) <= 0.15, row.group(0)
            assert row.group(7) == ("no difference shown" if printed_low <= 0 <= printed_high else "supported"), row.group(0)
    return seeds


def check_outputs(notebook):
    """What the notebook's text relies on is in its outputs: the rows of check_rows, a baseline of at
    least 45%, the image sizes ConvMixer takes and ViT and MLP-Mixer do not, the trained model's
    classes, and its own running time, which its first cell states."""
    out = printed(notebook)
    seeds = check_rows(out)
    assert sum(seeds[BASELINE]) / 3 >= 45, seeds[BASELINE]
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
    assert all(cell.outputs for cell in notebook.cells          # the cells tagged "models" only define
               if cell.cell_type == "code" and "models" not in cell.metadata.get("tags", []))
    check_outputs(notebook)


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None, reason="the notebook trains on the real CIFAR-10 (set CIFAR10_ROOT or "
                    "put it in ./data); without it, only its committed outputs are checked")
def test_tutorial_executes_top_to_bottom(monkeypatch):
    """Every cell runs, its training on 640 images (TUTORIAL_SMOKE: the numbers mean nothing; the
    committed outputs, checked above, are the full run's), and its rows keep their form."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("TUTORIAL_SMOKE", "1")                  # the kernel inherits it
    notebook = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()   # raises on error
    check_rows(printed(notebook))
    assert count_figures(notebook) >= 6


def t_quantile(q, df):
    """Student's t quantile by bisection on its CDF, the density integrated by Simpson's rule (written
    apart from the notebook's, so that the two check each other)."""
    density = lambda t: math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                                 - (df + 1) / 2 * math.log1p(t * t / df))
    def cdf(x, n=2000):
        h = x / n
        return 0.5 + h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * density(i * h) for i in range(n + 1))
    low, high = 0.0, 50.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < q else (low, middle)
    return (low + high) / 2


def test_the_t_quantile_used_to_check_the_notebook():
    for df, expected in [(2, 4.303), (4, 2.776), (10, 2.228)]:      # the usual t tables
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)
