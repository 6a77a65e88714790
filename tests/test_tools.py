"""tools/: the GPU check script (with a stand-in for python on a CPU), the committed 200-epoch run
and its plot, the mutants of tools/mutants.py, and the notebook's variants at full scale (tiny, on a CPU).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convmixer
from helpers import REAL_DATA, ROOT, read_log


def gpu_check_calls(tmp_path, step, **env):
    """The python commands tools/gpu_check.sh runs for `step`, recorded by a stand-in `python`."""
    stand_in = tmp_path / "bin" / "python"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text('#!/bin/sh\nprintf "%s|" "$@" >> "$CALLS"; echo >> "$CALLS"\n')
    stand_in.chmod(0o755)
    env = dict(os.environ, PATH=f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}",
               CALLS=str(tmp_path / "calls"), **env)
    result = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "out"), step], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.rstrip("|").split("|") for line in (tmp_path / "calls").read_text().splitlines()
            if not line.startswith("-c|")]                               # not its version line


def test_gpu_check_bench_runs_the_benchmark_at_batch_64_and_512(tmp_path):
    assert gpu_check_calls(tmp_path, "bench") == [
        ["fast/benchmark.py", "--hdim", "256", "--depth", "8", "--ksize", "9", "--batch-sizes", "64", "512",
         "--out", f"{tmp_path}/out/bench"]]


def test_gpu_check_grid_tries_the_short_recipe_on_a_hold_out_and_seeds_report_the_test_set(tmp_path):
    """The short recipe's trials train on 45,000 images and are judged on the 5,000 held out, never
    on the test set; the chosen setting then runs once per seed on all the training images."""
    grid = gpu_check_calls(tmp_path / "grid", "grid", GRID="official: lr:--lr=0.02,--wd=0.01")
    assert grid == [["train_cifar.py", "--recipe", "short", "--val", "5000", "--data", "data", "--out",
                     f"{tmp_path}/grid/out/grid_official"],
                    ["train_cifar.py", "--recipe", "short", "--val", "5000", "--lr=0.02", "--wd=0.01", "--data",
                     "data", "--out", f"{tmp_path}/grid/out/grid_lr"]]
    seeds = gpu_check_calls(tmp_path / "seeds", "seeds", SEEDS="3 4", SEED_FLAGS="--lr 0.02")
    assert seeds == [["train_cifar.py", "--recipe", "short", "--lr", "0.02", "--seed", str(s), "--data", "data",
                      "--out", f"{tmp_path}/seeds/out/short_recipe_seed{s}"] for s in (3, 4)]
    assert gpu_check_calls(tmp_path / "f16", "short_float16") == [
        ["train_cifar.py", "--recipe", "short", "--no-fast", "--amp-dtype", "float16", "--data", "data",
         "--out", f"{tmp_path}/f16/out/short_float16"]]


def test_gpu_check_main_starts_a_seed_then_continues_it(tmp_path):
    out = tmp_path / "first" / "out" / "cifar10_convmixer_256_8_k9_p1_seed1"
    assert gpu_check_calls(tmp_path / "first", "main", SEED="1") == [
        ["-X", "faulthandler", "train_cifar.py", "--hdim", "256", "--depth", "8", "--ksize", "9", "--seed", "1",
         "--data", "data", "--out", str(out)]]
    again = tmp_path / "again" / "out" / "cifar10_convmixer_256_8_k9_p1_seed1"
    again.mkdir(parents=True)
    (again / "last.pt").write_bytes(b"")                 # a run stopped after an epoch
    assert gpu_check_calls(tmp_path / "again", "main", SEED="1") == [
        ["-X", "faulthandler", "train_cifar.py", "--resume", "--data", "data", "--out", str(again)]]


def test_gpu_check_variants_runs_one_piece_of_the_tutorials_variants(tmp_path):
    assert gpu_check_calls(tmp_path, "variants", VARIANTS_MINUTES="5") == [
        ["tools/variants.py", "--data", "data", "--minutes", "5", "--out", f"{tmp_path}/out/tutorial_variants"]]
    assert gpu_check_calls(tmp_path / "chosen", "variants", SEED_FLAGS="--lr 0.02 --ra-m 6") == [
        ["tools/variants.py", "--data", "data", "--minutes", "8", "--out", f"{tmp_path}/chosen/out/tutorial_variants",
         "--", "--lr", "0.02", "--ra-m", "6"]]


MAIN_RUN = ROOT / "results" / "cifar10_convmixer_256_8_k9_p1"


@pytest.mark.slow
def test_the_committed_main_run_is_complete_and_its_model_predicts_as_committed():
    """The 200-epoch run under results/ (an earlier recipe: it erased before mixing): its log holds
    every epoch once and the final record, and convmixer_cifar10(pretrained=True), in the readable
    CPU model (float32, nn.Conv2d), gives the committed logits of the first 500 test images
    (tools/reference_logits.py): a loading or preprocessing bug changes them."""
    log = read_log(MAIN_RUN)
    epochs = [r for r in log if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == list(range(1, 201)) and log[0]["config"]["hdim"] == 256
    assert log[-1].get("final") and log[-1]["test_acc"] == epochs[-1]["test_acc"] == 95.88
    if REAL_DATA:
        import train_cifar
        images, labels = train_cifar.load_data(train_cifar.parse_args(["--device", "cpu", "--data", REAL_DATA]), False)
        committed = torch.load(MAIN_RUN / "test_logits.pt", weights_only=True)["logits"]
        logits = train_cifar.predict(convmixer.convmixer_cifar10(pretrained=True), images[:500], torch.device("cpu"), None)
        assert (logits.argmax(1) == committed.argmax(1)).float().mean() >= 0.998
        torch.testing.assert_close(logits, committed, atol=1e-2, rtol=0)


@pytest.mark.slow
def test_plot_run_draws_the_committed_runs_and_one_in_progress(tmp_path):
    runs = sorted(str(d) for d in (ROOT / "results").glob("cifar10_256_8_k5_p2_*"))
    assert len(runs) == 3
    in_progress = tmp_path / "in_progress"
    in_progress.mkdir()
    lines = (ROOT / "results" / "cifar10_256_8_k5_p2_plain_seed0" / "log.jsonl").read_text().splitlines()
    (in_progress / "log.jsonl").write_text("\n".join(lines[:13]) + "\n")                   # 12 epochs
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_run.py"), *runs, str(in_progress),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_run.py"), str(tmp_path),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "no log.jsonl there" in result.stderr


def test_every_mutant_of_tools_mutants_still_applies_to_the_code():
    """tools/mutants.py (run by hand: it takes minutes) edits the code by exact text; a change of
    the code that its edits no longer match is caught here, in CI."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import mutants
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert len(mutants.MUTANTS) >= 20 and len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    for m in mutants.MUTANTS:
        assert (ROOT / m.file).read_text().count(m.old) == 1, m.name
        assert m.old != m.new, m.name


# ---------------------------------------------------------------------------------------------
# tools/variants.py: the notebook's comparisons at full scale

sys.path.insert(0, str(ROOT / "tools"))
import variants  # noqa: E402

SHORT = {"hdim": 256, "depth": 8, "ksize": 5, "psize": 2, "n_classes": 10}
VARIANTS_TINY = ["--fake-data", "64", "--epochs", "2", "--batch-size", "32", "--hdim", "8", "--depth", "1",
                 "--device", "cpu", "--workers", "0"]


def test_variants_are_the_notebooks_models_at_the_short_recipes_size():
    """Each name builds its model from the notebook's own definitions: the paper's layout for "none",
    the one change for the others (checked on the layers it touches), a ViT and an MLP-Mixer within
    10% of ConvMixer-256/8's parameters; every model classifies a 32 x 32 image."""
    models = variants.notebook_models()
    built = {name: variants.model_for(name, dict(SHORT, psize=variants.PATCHES.get(name, 2)), models)
             for name in variants.NAMES}
    paper = convmixer.ConvMixer(256, 8, kernel_size=5, patch_size=2, n_classes=10)
    assert [tuple(v.shape) for v in built["none (paper)"].state_dict().values()] == \
        [tuple(v.shape) for v in paper.state_dict().values()]
    kinds = lambda name, kind: sum(isinstance(m, kind) for m in built[name].modules())
    assert kinds("BatchNorm -> LayerNorm", torch.nn.BatchNorm2d) == 0 and kinds("GELU -> ReLU", torch.nn.GELU) == 0
    assert kinds("no residual", convmixer.Residual) == 0
    assert isinstance(built["BatchNorm before GELU"][3][0].fn[1], torch.nn.BatchNorm2d)
    assert built["kernel 5 -> 9"][3][0].fn[0].kernel_size == (9, 9) and built["patch 2 -> 4"][0].stride == (4, 4)
    n = lambda name: sum(p.numel() for p in built[name].parameters())
    for name in variants.CONTENDERS:
        assert abs(n(name) / n("none (paper)") - 1) < 0.1, (name, n(name))
    for name, model in built.items():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10), name
    assert len(set(variants.FOLDER.values())) == len(variants.NAMES)


def test_variants_summary_lists_finished_runs_and_the_variants_with_all_three_seeds(tmp_path):
    def run(folder, acc, final=True):
        (tmp_path / folder).mkdir()
        records = [{"config": {}}, {"epoch": 1, "test_acc": acc - 1}] + ([{"final": True, "test_acc": acc}] if final else [])
        (tmp_path / folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for seed, acc in enumerate([90.0, 91.0, 92.0]):
        run(f"none_paper_seed{seed}", acc)
    run("gelu_relu_seed0", 89.0)
    run("gelu_relu_seed1", 88.0, final=False)                   # stopped: not a result yet
    variants.write_summary(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"] == {"none (paper)": {"0": 90.0, "1": 91.0, "2": 92.0}, "GELU -> ReLU": {"0": 89.0}}
    assert summary["final_test_acc"] == {"none (paper)": [90.0, 91.0, 92.0]}


def test_a_piece_starts_no_run_that_would_not_finish_before_its_deadline(tmp_path, monkeypatch, capsys):
    """With runs of 100 s (a made-up clock) and 4 minutes, the piece trains two and leaves the third
    whole for the next piece instead of cutting it."""
    clock = [0.0]
    monkeypatch.setattr(variants.time, "monotonic", lambda: clock[0])

    class Run:                                         # a child that takes 100 s and finishes its run
        returncode = 0
        def __init__(self, command):
            self.out = Path(command[command.index("--out") + 1])
        def wait(self, timeout=None):
            clock[0] += 100
            self.out.mkdir()
            (self.out / "log.jsonl").write_text(json.dumps({"final": True, "test_acc": 50.0}) + "\n")
    monkeypatch.setattr(variants.subprocess, "Popen", Run)
    assert variants.main(["--out", str(tmp_path), "--minutes", "4", "--only", "none (paper)"]) == 0
    assert sorted(f.name for f in tmp_path.iterdir() if f.is_dir()) == ["none_paper_seed0", "none_paper_seed1"]
    assert "stopped before none_paper_seed2, which would not finish in the time left" in capsys.readouterr().out


@pytest.mark.slow
def test_variants_run_in_pieces_that_continue_where_they_stopped(tmp_path):
    """A piece stopped at its deadline (wherever that lands) is continued by the next, and the run ends
    as an uninterrupted one does, keeping only its log; a finished run is not trained again. The MLP-Mixer's
    run trains the MLP-Mixer (its parameter count is in the log)."""
    def pieces(out, minutes, *names):
        result = subprocess.run([sys.executable, "tools/variants.py", "--out", str(out), "--minutes", str(minutes),
                                 "--seeds", "0", "--only", *names, "--", *VARIANTS_TINY],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout
    mixer = "MLP-Mixer (dim 64, depth 8, p2)"
    assert "all runs done" in pieces(tmp_path / "whole", 60, "none (paper)", mixer)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())["runs"]
    assert read_log(tmp_path / "whole" / "mlp_mixer_dim_64_depth_8_p2_seed0")[0]["n_params"] == \
        sum(p.numel() for p in variants.model_for(mixer, SHORT, variants.notebook_models()).parameters())

    first = pieces(tmp_path / "cut", 0.05, "none (paper)")             # a fast machine may finish it in time
    assert "stopped at the deadline" in first or "all runs done" in first, first
    assert "all runs done" in pieces(tmp_path / "cut", 60, "none (paper)")
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["runs"]["none (paper)"] == whole["none (paper)"]
    assert sorted(f.name for f in (tmp_path / "cut" / "none_paper_seed0").iterdir()) == ["log.jsonl"]
    log = tmp_path / "cut" / "none_paper_seed0" / "log.jsonl"
    before = log.stat().st_mtime_ns
    again = pieces(tmp_path / "cut", 60, "none (paper)")
    assert "starting" not in again and "resuming" not in again and log.stat().st_mtime_ns == before
