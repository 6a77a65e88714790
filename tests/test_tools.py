"""tools/: the GPU check script (with a stand-in for python on a CPU), the committed 200-epoch run
and its plot, and the mutants of tools/mutants.py.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convmixer
from helpers import REAL_DATA, ROOT, read_log, start_or_resume, without_timings


@pytest.mark.slow
def test_gpu_check_main_continues_a_run_committed_under_results(killable_reference, tmp_path):
    """tools/gpu_check.sh's main step, on the CPU: a run stopped mid-epoch and committed under
    results/ is continued in the output folder, its console kept in the run's folder, and a run
    that is complete is recognised as such."""
    reference, _ = killable_reference
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("train_cifar.py", "convmixer.py", "trainer", "fast", "tools"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, checkout / name)
    committed = checkout / "results" / "tiny"
    start_or_resume(committed, killer=["rename", 15]).communicate(timeout=300)   # killed in epoch 2
    (committed / "last.pt.tmp").unlink()                          # git ignores *.tmp
    stopped = torch.load(committed / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (1, 1)
    env = {**os.environ, "RUN_NAME": "tiny", "MAIN_FLAGS": "--device cpu --workers 0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def gpu_check(out):
        return subprocess.run(["bash", "tools/gpu_check.sh", str(out), "main"], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=300)
    result = gpu_check(tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "out" / "tiny"
    assert f"main: continuing results/tiny in {run}" in result.stdout
    assert "3 epochs, complete; 2 pieces" in result.stdout and "| 2 | epoch 2, step 1 | end of epoch 3 |" \
        in result.stdout
    console = (run / "console.txt").read_text()
    assert console.startswith(f"resuming {run} at epoch 2, step 1") and "final test accuracy" in console
    assert console.splitlines()[-1].startswith("main: train_cifar.py exited with status 0, ")
    assert not (run / "last.pt").exists() and (run / "model.pt").exists()
    assert without_timings(read_log(run)) == without_timings(read_log(reference))
    a, b = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (run, reference))
    assert all(torch.equal(a[k], v) for k, v in b.items())
    again = gpu_check(tmp_path / "out")
    assert again.returncode == 0 and f"main: {run} is complete" in again.stdout


@pytest.mark.slow
def test_gpu_check_tests_select_the_training_paths_gpu_tests_and_all_adds_the_rest():
    """tools/gpu_check.sh's two pytest -k selections, collected here: the default one must hold
    every CUDA-only test (but torch.compile's model in a CUDA graph, not on the training path), the
    kernels at the main job's shapes (a typo there would cost a GPU its test step) and the fused
    GELU -> BatchNorm's tests (but torch.compile's), and no float32 kernel test of another shape,
    which GPU_TESTS=all adds."""
    import re
    default, everything = re.findall(r'selection="([^"]+)"', (ROOT / "tools" / "gpu_check.sh").read_text())

    def collected(expression):
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 "-m", "", "-k", expression, "tests"], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        return {line.split("::", 1)[1] for line in result.stdout.splitlines() if line.startswith("tests/")}
    chosen, all_of_them = collected(default), collected(everything)
    cuda_only = {name for f in (ROOT / "tests").glob("test_*.py")
                 for name in re.findall(r"^def (test_\w*cuda_only\w*)\(", f.read_text(), re.M)}
    cuda_only_tests = {t for t in all_of_them if t.split("[")[0] in cuda_only}     # with parameters
    assert len(cuda_only) >= 5 and {t.split("[")[0] for t in cuda_only_tests} == cuda_only
    assert cuda_only_tests - chosen == {"test_device_step_cuda_only_graph_replays_what_the_eager_step_does"
                                        "[torch_compile]"}, cuda_only_tests - chosen
    assert {f"test_fast_depthwise_matches_conv2d_bfloat16_autocast[{b}-{k}-{a}]" for b, k in [(1, 9), (64, 8), (512, 9)]
            for a in ("direct", "toeplitz")} <= chosen
    assert {"test_fast_depthwise_matches_conv2d_float32[direct-2-3-32-32-9]",
            "test_fast_depthwise_matches_conv2d_float32[toeplitz-2-3-32-32-9]",
            "test_fast_depthwise_toeplitz_stacks_16_bit_planes_including_partial_stacks[17]",
            "test_fast_depthwise_bfloat16_partial_stacks_and_bias_gradient[17]",
            "test_batch_augment_on_cuda_matches_the_cpu_for_the_same_parameters"} <= chosen
    fused_norm = {t for t in all_of_them if t.startswith("test_fused_gelu_batchnorm_")}   # --fused-norm's kernels
    assert len(fused_norm) >= 12 and fused_norm - chosen == {"test_fused_gelu_batchnorm_compiles_into_one_graph"}
    assert not {t for t in chosen if t.startswith("test_benchmark")}          # CPU runs of a subprocess
    float32 = {t for t in all_of_them if t.startswith("test_fast_depthwise_matches_conv2d_float32[")}
    assert len(float32) == 22 and chosen & float32 == {t for t in float32 if "-32-32-9]" in t}
    assert chosen < all_of_them


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


def test_gpu_check_bench_runs_the_benchmark_eager_fused_then_compiled(tmp_path):
    """Three benchmark runs of the main job's model at batch 64 and 512, each into its own folder,
    torch.compile's last; BENCH_RUNS picks some of them, and a name that is none of them stops the
    script before it runs anything."""
    model = ["fast/benchmark.py", "--hdim", "256", "--depth", "8", "--ksize", "9", "--batch-sizes", "64", "512"]
    eager, fused, compiled = [], ["--fused-norm", "--paths", "fast", "fast_graph"], ["--compile"]

    def calls(folder, runs):
        return [model + flags + ["--out", f"{tmp_path}/{folder}/out/{name}"] for name, flags in runs]
    assert gpu_check_calls(tmp_path / "all", "bench") == calls(
        "all", [("bench", eager), ("bench_fused_norm", fused), ("bench_compile", compiled)])
    assert gpu_check_calls(tmp_path / "two", "bench", BENCH_RUNS="bench_compile bench_fused_norm") == calls(
        "two", [("bench_fused_norm", fused), ("bench_compile", compiled)])
    typo = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "typo"), "tests", "bench"], cwd=ROOT,
                          env=dict(os.environ, BENCH_RUNS="bench_fusednorm"), capture_output=True, text=True)
    assert typo.returncode == 2 and not (tmp_path / "typo").exists()
    assert "BENCH_RUNS: no run named bench_fusednorm (bench bench_fused_norm bench_compile)" in typo.stdout


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


@pytest.mark.slow
def test_gpu_check_sigterm_needs_both_stop_lines_of_every_run(tmp_path):
    """A stand-in trainer that stops as train_cifar.py does on SIGTERM passes; one that dies without
    its stop lines fails the step."""
    stand_in = tmp_path / "bin" / "python"
    stand_in.parent.mkdir(parents=True)
    for lines, code in [("both", 0), ("none", 1)]:
        stand_in.write_text("#!/bin/bash\n[ \"$1\" = -c ] && exit 0          # the version line\n" + (
            'trap \'echo "SIGTERM: stopping after this step and saving last.pt"; '
            'echo "SIGTERM: stopped at epoch 1, step 9; continue with --resume" >&2; exit 143\' TERM\n'
            if lines == "both" else "trap 'exit 143' TERM\n") + "while true; do sleep 0.1; done\n")
        stand_in.chmod(0o755)
        env = dict(os.environ, PATH=f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}", SIGTERM_AFTER="1 2")
        result = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / lines), "sigterm"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == code, result.stdout + result.stderr
        summary = (tmp_path / lines / "sigterm.txt").read_text().splitlines()
        assert summary == [f"sigterm after {s} s: exit 143, {2 if lines == 'both' else 0} of the 2 stop lines"
                           for s in (1, 2)]


def test_gpu_check_short_run_takes_its_flags_and_folder(tmp_path):
    calls = gpu_check_calls(tmp_path, "short", SHORT_FLAGS="--fused-norm --step-mode host",
                            SHORT_NAME="short_fused_norm")
    assert calls == [["train_cifar.py", "--hdim", "256", "--depth", "8", "--ksize", "5", "--psize", "2",
                      "--epochs", "25", "--batch-size", "512", "--fast", "--fused-norm", "--step-mode", "host",
                      "--data", "data", "--out", f"{tmp_path}/out/short_fused_norm"]]


MAIN_RUN = ROOT / "results" / "cifar10_convmixer_256_8_k9_p1"


@pytest.mark.slow
def test_the_committed_main_run_is_the_main_job_complete_and_its_model_scores_as_logged():
    """The 200-epoch run under results/, the README's headline: its recipe is the main command's
    defaults (how a step ran aside), its log holds every epoch and the final record, last.pt is gone
    (nothing is left to continue), and with the real test set the published weights
    (convmixer_cifar10(pretrained=True), in the readable CPU model: float32, nn.Conv2d) score on 500
    test images about what the log says the run scored on all 10,000 (bfloat16, Triton kernels)."""
    import train_cifar
    from trainer.files import CHANGEABLE_ON_RESUME
    log = read_log(MAIN_RUN)
    defaults = train_cifar.parse_args([])
    same = [k for k in train_cifar.RECIPE_KEYS if k not in CHANGEABLE_ON_RESUME | {"fast"}]
    recipe = log[0]["config"]
    assert {k: recipe.get(k) for k in same} == {k: getattr(defaults, k) for k in same} and recipe["fast"]
    assert (defaults.hdim, defaults.depth, defaults.ksize, defaults.psize) == (256, 8, 9, 1)
    epochs = [r for r in log if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == list(range(1, recipe["epochs"] + 1)) == list(range(1, 201))
    starts = [(r["epoch"], r["step"]) for r in log if r.get("resumed")]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)         # each piece went on
    final = log[-1]
    assert final.get("final") and final["test_acc"] == epochs[-1]["test_acc"]
    assert not (MAIN_RUN / "last.pt").exists()
    saved = torch.load(MAIN_RUN / "model.pt", weights_only=True)
    assert {k: saved["config"][k] for k in ("hdim", "depth", "ksize", "psize")} == \
        {k: recipe[k] for k in ("hdim", "depth", "ksize", "psize")}
    if REAL_DATA:
        images, labels = train_cifar.load_cifar10(REAL_DATA, train=False)
        model = convmixer.convmixer_cifar10(pretrained=True)
        accuracy, = train_cifar.evaluate(model, images[:500], labels[:500], torch.device("cpu"), amp=None)
        assert abs(accuracy - final["test_acc"]) < 4, (accuracy, final["test_acc"])   # 500 images: +-1% s.d.


@pytest.mark.slow
def test_plot_run_draws_the_committed_runs_and_one_in_progress(tmp_path):
    runs = sorted(str(d) for d in (ROOT / "results").glob("cifar10_256_8_k5_p2_*"))
    assert len(runs) == 3
    in_progress = tmp_path / "in_progress"
    in_progress.mkdir()
    lines = (ROOT / "results" / "cifar10_256_8_k5_p2_plain_seed0" / "log.jsonl").read_text().splitlines()
    (in_progress / "log.jsonl").write_text("\n".join(lines[:13]) + "\n" + lines[13][:30])  # 12 epochs, torn
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_run.py"), *runs, str(in_progress),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert "cut short" in result.stderr
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
