"""fast/: the device step and its CUDA graph, --compile and --fused-norm in training, the benchmark,
the Triton depthwise convolution and the fused GELU -> BatchNorm against the PyTorch modules they
replace (on a CPU in Triton's interpreter; the bfloat16 and CUDA-graph checks need a GPU).
"""
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from convmixer import ConvMixer
from test_convmixer import randomize_
from helpers import (DEVICE, ROOT, error_lines_of_main, read_log, run_script, start_or_resume,
                     storage_locations, without_timings)


def test_the_cuda_only_lines_run_on_a_cpu_bfloat16_autocast_and_fused_adamw():
    """What a first GPU run would otherwise be the first to execute."""
    import train_cifar
    recipe = train_cifar.parse_args(["--hdim", "16", "--depth", "1", "--psize", "4", "--device", "cpu"])
    results = {}
    for amp, fused in [(None, False), (torch.bfloat16, True)]:
        torch.manual_seed(0)
        model = ConvMixer(16, 1, 9, 4, n_classes=10)
        optimizer = train_cifar.make_optimizer(model, recipe, fused=fused)
        assert bool(optimizer.defaults["fused"]) == fused
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        x, targets = torch.randn(8, 3, 32, 32), nn.functional.one_hot(torch.arange(8) % 10, 10).float()
        loss, correct = train_cifar.train_step(model, optimizer, criterion, x, targets, 0.01, amp, 1.0)
        accuracies = train_cifar.evaluate(model, torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8),
                                          torch.arange(16) % 10, torch.device("cpu"), amp, flip_tta=True)
        assert len(accuracies) == 2 and all(0 <= a <= 100 for a in accuracies) and 0 <= correct <= 8
        results[amp] = (loss, [p.detach().clone() for p in model.parameters()])
    assert results[torch.bfloat16][0] == pytest.approx(results[None][0], rel=0.05)     # bfloat16: ~3 digits
    for p_amp, p_fp32 in zip(results[torch.bfloat16][1], results[None][1]):
        torch.testing.assert_close(p_amp, p_fp32, rtol=0.05, atol=2e-3)
    assert train_cifar.make_optimizer(model, recipe).defaults["fused"] is None   # CPU default


def device_step_setup(fused_optimizer=True, seed=0):
    import train_cifar
    recipe = train_cifar.parse_args(["--hdim", "16", "--depth", "1", "--psize", "4", "--device", "cpu"])
    torch.manual_seed(seed)
    model = ConvMixer(16, 1, 9, 4, n_classes=10)
    optimizer = train_cifar.make_optimizer(model, recipe, fused=fused_optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=g),
                nn.functional.one_hot(torch.randperm(10, generator=g)[:8], 10).float()) for _ in range(6)]
    return model, optimizer, criterion, batches


def test_device_step_equals_the_host_step_and_skips_a_non_finite_loss_on_the_device():
    """fast/step.py's DeviceStep against train_step (both with the fused AdamW it needs): the same
    weights, optimizer state and running sums, bit for bit, with a gradient clipping that acts at
    every step; then non-finite losses, which leave the weights as they were, for those steps and
    the ones after them, and the first of which is reported by its step count."""
    import train_cifar
    from fast.step import DeviceStep
    clip = 0.5                      # these gradients' norms are 0.67-0.71: clipped at every step
    host_model, host_optimizer, criterion, batches = device_step_setup()
    model, optimizer, _, _ = device_step_setup()
    step = DeviceStep(model, optimizer, criterion, amp=None, clip=clip, device=torch.device("cpu"))
    step.start(100, 5.0, 2.0)                                     # resumed mid-epoch, say
    sums = [5.0, 2.0]
    for i, (x, t) in enumerate(batches[:4]):
        lr = 0.001 * (i + 1)
        loss, correct = train_cifar.train_step(host_model, host_optimizer, criterion, x, t, lr, None, clip)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in host_model.parameters()]))
        assert norm.item() == pytest.approx(clip, rel=1e-5)       # the clipping acted
        sums = [sums[0] + loss * len(x), sums[1] + correct]
        assert step(x, t, lr).item() == loss
    assert step.read() == (*sums, None)
    for a, b in zip(model.state_dict().values(), host_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), host_optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    before = {k: v.clone() for k, v in model.named_parameters()}
    x, t = batches[4]
    assert train_cifar.train_step(host_model, host_optimizer, criterion, x, t * float("nan"), 0.01, None,
                                  clip) is None
    step(x, t * float("nan"), 0.01)                               # the 105th step of the run
    step(x, t * float("inf"), 0.01)                               # another bad one
    step(*batches[5], 0.01)                                       # a good one after them: skipped too
    assert step.read() == (*sums, 105)                           # nothing added for the bad steps
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="fused AdamW"):
        DeviceStep(*device_step_setup(fused_optimizer=False)[:3], amp=None, clip=1.0,
                   device=torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("model_kind", ["gelu_then_batchnorm", "fused_gelu_batchnorm", "torch_compile"])
def test_device_step_cuda_only_graph_replays_what_the_eager_step_does(model_kind):
    """The whole step captured in a CUDA graph and replayed: the same weights as the eager step (the
    same kernels), the warm-up of the capture undone (BatchNorm's running statistics too), a bad step
    skipped. The model as convmixer.py builds it; with GELU -> BatchNorm fused (fast/gelu_batchnorm.py);
    and called through torch.compile (--compile --step-mode graph: not a default, as it is untested)."""
    from fast.gelu_batchnorm import use_fused_gelu_batch_norm
    from fast.step import DeviceStep
    results = []
    for graph in (False, True):
        model, optimizer, criterion, batches = device_step_setup()
        model = model.cuda()
        if model_kind == "fused_gelu_batchnorm":
            use_fused_gelu_batch_norm(model)
        net = torch.compile(model) if model_kind == "torch_compile" else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.0, device="cuda"), eps=1e-3,
                                      fused=True, capturable=True)
        step = DeviceStep(net, optimizer, criterion, amp=torch.bfloat16, clip=1.0, device=torch.device("cuda"),
                          graph=graph)
        step.start(0, 0.0, 0.0)
        for i, (x, t) in enumerate(batches[:5]):
            step(x.cuda(), t.cuda(), 0.001 * (i + 1))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        step(batches[5][0].cuda(), batches[5][1].cuda() * float("nan"), 0.01)
        *sums, bad = step.read()
        assert bad == 6 and all(torch.equal(p, before[k]) for k, p in model.named_parameters())
        results.append((before, sums))
    (eager, eager_sums), (graphed, graphed_sums) = results
    for k, v in eager.items():
        torch.testing.assert_close(graphed[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert graphed_sums == pytest.approx(eager_sums, rel=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compile_trains_as_the_eager_model_does(tmp_path):
    """--compile (torch.compile of the model, which the training step calls; here with the device
    step, which calls the same model): the eager run's losses and accuracy, up to float rounding."""
    flags = ["--hdim", "16", "--depth", "1", "--psize", "4", "--epochs", "2", "--batch-size", "100",
             "--fake-data", "400", "--device", "cpu", "--workers", "0", "--step-mode", "device"]
    run_script(*flags, "--out", tmp_path / "eager")
    first_line = run_script(*flags, "--compile", "--out", tmp_path / "compiled").stdout.splitlines()[0]
    assert ", step mode device, torch.compile; writing to " in first_line          # says how it runs
    eager, compiled = (without_timings(read_log(tmp_path / name)) for name in ("eager", "compiled"))
    losses = [[r.pop("train_loss", None) for r in log] for log in (eager, compiled)]
    assert len(eager) == 3 and losses[0][0] is not None
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for a, b in zip(compiled, eager):       # a near-tie may flip a prediction: one of the 80 test images
        assert {k: v for k, v in a.items() if "acc" not in k} == {k: v for k, v in b.items() if "acc" not in k}
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 100 / 80 for k in a if "acc" in k), (a, b)


@pytest.mark.slow
def test_fused_norm_trains_as_gelu_then_batchnorm_does(tmp_path, gelu_batchnorm, monkeypatch, capsys):
    """--fused-norm (opt-in; on a CPU in Triton's interpreter, as here): the losses and accuracies of
    the run with nn.GELU -> nn.BatchNorm2d, up to float rounding; the first line and the log say it.
    Without CUDA or the interpreter it is refused at the start, and a run that has it continues there
    only with --no-fused-norm."""
    flags = ["--hdim", "4", "--depth", "1", "--ksize", "3", "--psize", "8", "--epochs", "2", "--batch-size",
             "25", "--fake-data", "100", "--device", DEVICE, "--workers", "0", "--fast"]
    import train_cifar
    model, _ = train_cifar.prepare_model(train_cifar.parse_args([*flags, "--fused-norm"]), torch.device(DEVICE))
    assert sum(isinstance(m, gelu_batchnorm.FusedGeluBatchNorm2d) for m in model.modules()) == 1 + 2 * 1
    run_script(*flags, "--out", tmp_path / "pair")
    first_line = run_script(*flags, "--fused-norm", "--out", tmp_path / "fused").stdout.splitlines()[0]
    assert ", fused GELU -> BatchNorm" in first_line and "; writing to " in first_line
    assert [read_log(tmp_path / name)[0]["config"]["fused_norm"] for name in ("pair", "fused")] == [False, True]
    pair, fused = (without_timings(read_log(tmp_path / name)) for name in ("pair", "fused"))
    losses = [[r.pop("train_loss", None) for r in log] for log in (pair, fused)]
    assert len(pair) == 3 and losses[0][0] is not None and losses[1] == pytest.approx(losses[0], rel=1e-4)
    for a, b in zip(fused, pair):           # a near-tie may flip a prediction: 1 of the 20 test images
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 100 / 20 for k in a if "acc" in k), (a, b)
        assert {k: v for k, v in a.items() if "acc" not in k} == {k: v for k, v in b.items() if "acc" not in k}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)          # a CPU without the interpreter:
    lines = error_lines_of_main(["--fused-norm", "--device", "cpu"], capsys)
    assert "error: --fused-norm runs Triton kernels, which need a CUDA device, not cpu" in lines[-1]
    from trainer import files                   # a fused run continued there (as if it were stopped)
    stored = torch.load(tmp_path / "fused" / "last.pt", weights_only=True)["recipe"]
    monkeypatch.setattr(files, "stored_resume_state", lambda out, keys: {"recipe": dict(stored)})
    resume = ["--resume", "--out", str(tmp_path / "fused"), "--device", "cpu"]
    with pytest.raises(train_cifar.Fail, match="continue it here with --resume --no-fused-norm"):
        files.read_resume_state(tmp_path / "fused", train_cifar.RECIPE_KEYS, train_cifar.parse_args(resume))
    args = train_cifar.parse_args([*resume, "--no-fused-norm"])
    recipe = files.read_resume_state(tmp_path / "fused", train_cifar.RECIPE_KEYS, args)["recipe"]
    assert recipe["fused_norm"] is False


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast on a GPU")
def test_float16_cuda_only_trains_as_bfloat16_does_and_keeps_its_loss_scale(tmp_path):
    """The precision older GPUs take (--amp-dtype float16, loss scaling, the plain path), forced on
    this GPU: the same losses as the bfloat16 run up to 16-bit rounding, and the scaler's state in
    last.pt, written from the GPU as CPU tensors."""
    losses = {}
    for dtype in ("bfloat16", "float16"):
        result = run_script("--hdim", "64", "--depth", "2", "--ksize", "9", "--psize", "2", "--epochs", "2",
                            "--batch-size", "64", "--fake-data", "1024", "--no-fast", "--amp-dtype", dtype,
                            "--out", tmp_path / dtype)
        assert f"{dtype} autocast" in result.stdout.splitlines()[0]
        losses[dtype] = [r["train_loss"] for r in read_log(tmp_path / dtype) if "train_loss" in r]
    assert losses["float16"] == pytest.approx(losses["bfloat16"], rel=0.02), losses
    assert torch.load(tmp_path / "float16" / "last.pt", weights_only=True)["scaler"]["scale"] > 1
    assert storage_locations(tmp_path / "float16" / "last.pt") == {"cpu"}


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CUDA step modes")
def test_train_cifar_cuda_only_step_modes_train_alike(tmp_path):
    """A short --fast run with the step checked on the host, on the device, and replayed as a CUDA
    graph: the same schedule and data, so the same losses up to the order of floating-point sums.
    Its model.pt and last.pt, written from the GPU, hold CPU tensors: they load on any machine."""
    logs = {}
    for mode in ("host", "device", "graph"):
        run_script("--hdim", "64", "--depth", "2", "--ksize", "9", "--psize", "2", "--epochs", "2",
                   "--batch-size", "64", "--fake-data", "1024", "--fast", "--step-mode", mode,
                   "--out", tmp_path / mode)
        logs[mode] = [r["train_loss"] for r in read_log(tmp_path / mode) if "train_loss" in r]
        assert storage_locations(tmp_path / mode / "model.pt") == storage_locations(tmp_path / mode / "last.pt") \
            == {"cpu"}
    for mode in ("device", "graph"):
        assert logs[mode] == pytest.approx(logs["host"], rel=0.02), (mode, logs)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_host_run_continues_cuda_only_as_a_graph_run(tmp_path):
    """What a long run started with the host step may do once the graph's tests pass: stopped
    mid-epoch, it continues with --resume --step-mode graph (its fused AdamW's state loaded, then
    made capturable) and trains on as its uninterrupted twin does, up to the order of sums."""
    new_run = ["--hdim", "64", "--depth", "2", "--ksize", "9", "--psize", "2", "--epochs", "2",
               "--batch-size", "64", "--fake-data", "1024", "--fast", "--step-mode", "host"]
    run_script(*new_run, "--out", tmp_path / "reference")
    out = tmp_path / "run"
    start_or_resume(out, killer=["rename", 10], new_run=new_run).communicate(timeout=300)
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (0, 7) and stopped["recipe"]["step_mode"] == "host"
    result = run_script("--resume", "--out", out, "--step-mode", "graph")
    assert "resuming with --step-mode graph (it was host)" in result.stdout
    assert ", step mode graph; writing to " in result.stdout
    resumes = [r for r in read_log(out) if r.get("resumed")]
    assert [(r["epoch"], r["step"], r["step_mode"]) for r in resumes] == [(1, 7, "graph")]
    losses = {name: [r["train_loss"] for r in read_log(tmp_path / name) if "train_loss" in r]
              for name in ("reference", "run")}
    assert len(losses["run"]) == 2 and losses["run"] == pytest.approx(losses["reference"], rel=0.02), losses
    adamw = torch.load(out / "last.pt", weights_only=True)["optimizer"]["state"]    # moments kept: 2 x 16 steps
    assert [float(state["step"]) for state in adamw.values()] == [32.0] * len(adamw)


@pytest.mark.slow
def test_without_triton_the_fast_path_says_it_keeps_pytorchs_depthwise_convs(capsys):
    """Triton comes with torch's Linux CUDA wheels only. Where it cannot be imported (Windows, say),
    the log records it as None on CUDA, and the run's first line says that the depthwise convs
    stay PyTorch's (the batch augmentation on the device stays too)."""
    from argparse import Namespace

    from trainer.files import triton_version
    from trainer.housekeeping import announce
    hidden = subprocess.run([sys.executable, "-c", "import sys; sys.modules['triton'] = None\n"
                             "from trainer.files import triton_version; print(triton_version())"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert hidden.stdout.strip() == "None", hidden.stdout + hidden.stderr
    installed = importlib.util.find_spec("triton")
    assert triton_version() == (importlib.import_module("triton").__version__ if installed else None)
    recipe = Namespace(hdim=256, depth=8, ksize=9, psize=1, n_train=50_000, epochs=200, fast=True,
                       step_mode="host", compile=False, fused_norm=False, amp=True, amp_dtype="bfloat16")
    for versions, says in [({"triton": None}, " (fast path; no Triton here, so PyTorch's depthwise convs)"),
                           ({"triton": "3.6.0"}, " (fast path)"), ({}, " (fast path)")]:      # {}: a CPU
        announce(recipe, 706_058, 781, {"device": "GPU", "code": None, "versions": versions}, "runs/x")
        assert f" on GPU{says}, bfloat16 autocast; writing to runs/x" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels are swapped in on CUDA")
def test_prepare_model_cuda_only_swaps_in_the_triton_kernels_where_triton_is(monkeypatch):
    import train_cifar
    from argparse import Namespace
    from fast.depthwise import FastDepthwiseConv2d
    from fast.gelu_batchnorm import FusedGeluBatchNorm2d
    from trainer.files import where_it_ran
    recipe = Namespace(hdim=16, depth=1, ksize=9, psize=1, fast=True, compile=False, fused_norm=False)
    model, _ = train_cifar.prepare_model(recipe, torch.device("cuda"))
    assert FastDepthwiseConv2d in {type(m) for m in model.modules()}
    assert FusedGeluBatchNorm2d not in {type(m) for m in model.modules()}            # opt-in
    fused, _ = train_cifar.prepare_model(Namespace(**{**vars(recipe), "fused_norm": True}), torch.device("cuda"))
    assert {FastDepthwiseConv2d, FusedGeluBatchNorm2d} <= {type(m) for m in fused.modules()}
    assert where_it_ran(torch.device("cuda"))["versions"]["triton"] == importlib.import_module("triton").__version__
    monkeypatch.setattr(train_cifar, "triton_version", lambda: None)       # as where it is missing
    model, _ = train_cifar.prepare_model(recipe, torch.device("cuda"))
    assert FastDepthwiseConv2d not in {type(m) for m in model.modules()}
    assert model(torch.randn(2, 3, 32, 32, device="cuda")).shape == (2, 10)


@pytest.mark.slow
def test_benchmark_measures_every_path_at_both_batch_sizes_in_one_file(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "fast" / "benchmark.py"), "--hdim", "16",
                             "--depth", "1", "--ksize", "3", "--psize", "4", "--batch-sizes", "8", "16",
                             "--steps", "2", "--device", "cpu", "--workers", "0",
                             "--out", str(tmp_path / "bench")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    bench = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert bench["config"] == {"hdim": 16, "depth": 1, "ksize": 3, "psize": 4, "amp_dtype": "float32", "compile": False,
                               "fused_norm": False, "workers": 0, "steps": 2}
    for b in (8, 16):
        section = bench[f"batch_{b}"]
        assert list(section) == ["plain", "fast", "fast_device"]               # no CUDA graph on a CPU
        for path, m in section.items():
            assert m["img_s"] > 0 and m["model_only_img_s"] > 0
            assert m["recipe_training_seconds"] == pytest.approx(200 * 50_000 / m["img_s"])
            assert ("augment_only_img_s" in m) == (path != "plain")
            profile = m["profile"]                  # on a CPU: operators by their own time
            assert profile["steps"] == 2 and 0 < profile["busy_fraction"] <= 1.05
            times = [row["ms_per_step"] for row in profile["top"]]
            assert times == sorted(times, reverse=True) and sum(times) <= profile["busy_ms_per_step"] + 1e-6
            assert any("convolution" in row["name"] for row in profile["top"])
            assert profile["launches_per_step"] >= len(profile["top"])     # each row launched at least once
            assert f"batch {b}, {path}, profile of 2 steps" in result.stdout
        fast, plain = section["fast"]["img_s"], section["plain"]["img_s"]
        assert section["fast"]["speedup_over_plain"] == pytest.approx(fast / plain)


def test_benchmark_saves_each_path_as_soon_as_it_is_measured(tmp_path, monkeypatch):
    from fast import benchmark
    args = benchmark.parse_args(["--hdim", "8", "--depth", "1", "--ksize", "3", "--psize", "8",
                                 "--batch-sizes", "16", "--paths", "fast", "plain", "--steps", "1",
                                 "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "b")])
    measure = benchmark.measure_path

    def cut_short_after_the_first_path(args, path, *rest):      # as a time limit would
        if path != "fast":
            raise KeyboardInterrupt
        return measure(args, path, *rest)

    monkeypatch.setattr(benchmark, "measure_path", cut_short_after_the_first_path)
    with pytest.raises(KeyboardInterrupt):
        benchmark.benchmark(args)
    bench = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert bench["batch_16"]["fast"]["img_s"] > 0 and bench["batch_16"]["fast"]["profile"]["steps"] == 1
    assert "plain" not in bench["batch_16"] and not list((tmp_path / "b").glob("*.tmp"))


@pytest.mark.slow
def test_benchmark_fused_norm_puts_the_fused_gelu_batchnorm_in_the_fast_paths_only(tmp_path, gelu_batchnorm):
    from fast import benchmark
    # Small, since Triton's interpreter runs one program at a time: 2 channels x 4 images.
    args = benchmark.parse_args(["--hdim", "2", "--depth", "1", "--ksize", "3", "--psize", "8",
                                 "--batch-sizes", "4", "--paths", "plain", "fast_device", "--steps", "1",
                                 "--fused-norm", "--device", "cpu", "--workers", "0", "--out", str(tmp_path)])
    bench = benchmark.benchmark(args)
    assert bench["config"]["fused_norm"] is True
    operators = {path: " ".join(row["name"] for row in bench["batch_4"][path]["profile"]["top"])
                 for path in ("plain", "fast_device")}
    assert "convmixer::gelu_batch_norm" in operators["fast_device"]
    assert "gelu_batch_norm" not in operators["plain"]


@pytest.mark.slow
def test_train_cifar_does_not_import_the_benchmark():
    """fast/benchmark.py imports train_cifar.py, and not the other way round."""
    import ast
    tree = ast.parse((ROOT / "train_cifar.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [name for name in imported if "benchmark" in name]
    result = subprocess.run([sys.executable, "-c", "import sys, train_cifar; "
                             "sys.exit('fast.benchmark' in sys.modules)"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0


@pytest.mark.parametrize("B,C,H,W,k", [
    (1, 3, 8, 8, 3), (2, 4, 7, 5, 4), (2, 2, 40, 6, 2), (1, 1, 1, 1, 1),
    *[pytest.param(*shape, marks=pytest.mark.slow) for shape in
      [(3, 2, 9, 70, 9), (17, 2, 5, 6, 3), (2, 3, 32, 32, 9), (2, 2, 50, 20, 8), (2, 2, 12, 31, 7), (64, 1, 3, 3, 3)]],
    # The interpreter runs one program at a time (about 2 minutes for this one): GPU only.
    pytest.param(512, 2, 3, 3, 5, marks=pytest.mark.skipif(DEVICE == "cpu", reason="slow in the interpreter")),
])
@pytest.mark.parametrize("algorithm", ["direct", "toeplitz"])
def test_fast_depthwise_matches_conv2d_float32(fast_depthwise, algorithm, B, C, H, W, k):
    if algorithm == "toeplitz" and W > fast_depthwise.TOEPLITZ_MAX_WIDTH:
        pytest.skip("toeplitz takes rows up to TOEPLITZ_MAX_WIDTH (test_fast_depthwise_algorithm_must_fit)")
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, k, groups=C, padding="same").to(DEVICE)
    fast = fast_depthwise.FastDepthwiseConv2d(conv, algorithm)
    x = torch.randn(B, C, H, W, device=DEVICE, requires_grad=True)
    grad_y = torch.randn(B, C, H, W, device=DEVICE)
    expected = [conv(x), *torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), grad_y)]
    got = [fast(x), *torch.autograd.grad(fast(x), (x, conv.weight, conv.bias), grad_y)]
    for name, e, g in zip(["output", "grad_input", "grad_weight", "grad_bias"], expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 kernels are checked on a GPU")
@pytest.mark.parametrize("algorithm", ["direct", "toeplitz"])
@pytest.mark.parametrize("B,k", [(1, 9), (64, 8), (512, 9)])
def test_fast_depthwise_matches_conv2d_bfloat16_autocast(fast_depthwise, algorithm, B, k):
    conv = nn.Conv2d(256, 256, k, groups=256, padding="same").cuda()
    fast = fast_depthwise.FastDepthwiseConv2d(conv, algorithm)
    x = torch.randn(B, 256, 32, 32, device="cuda", requires_grad=True)
    grad_y = torch.randn(B, 256, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", torch.bfloat16):
        e, g = conv(x), fast(x)
    assert g.dtype == e.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)
    for ge, gg in zip(torch.autograd.grad(e, (x, conv.weight), grad_y),
                      torch.autograd.grad(g, (x, conv.weight), grad_y)):
        assert gg.dtype == ge.dtype
        torch.testing.assert_close(gg.float(), ge.float(), rtol=2e-2, atol=2e-2 * ge.abs().max().item())


@pytest.mark.parametrize("B", [1, 3, 5, 17])
def test_fast_depthwise_toeplitz_stacks_16_bit_planes_including_partial_stacks(fast_depthwise, B):
    """16-bit inputs stack several images' planes into one tile (4 CIFAR-10 planes at p = 1);
    a batch that is not a multiple of the stack leaves a partial one. float16 runs the same
    stacked code as bfloat16 and, unlike bfloat16, also in Triton's interpreter on a CPU."""
    assert fast_depthwise._images_per_program(B, 32, torch.float16) == min(4, 1 << (B - 1).bit_length())
    torch.manual_seed(B)
    conv = nn.Conv2d(2, 2, 9, groups=2, padding="same").to(DEVICE)
    fast = fast_depthwise.FastDepthwiseConv2d(conv, "toeplitz")
    x = torch.randn(B, 2, 32, 32, device=DEVICE).half().requires_grad_()
    grad_y = torch.randn(B, 2, 32, 32, device=DEVICE).half()
    got = [fast(x), *torch.autograd.grad(fast(x), (x, conv.weight, conv.bias), grad_y)]
    x32 = x.detach().float().requires_grad_()
    expected = [conv(x32), *torch.autograd.grad(conv(x32), (x32, conv.weight, conv.bias), grad_y.float())]
    for name, e, g in zip(["output", "grad_input", "grad_weight", "grad_bias"], expected, got):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g.float(), e, rtol=1e-2, atol=2e-3 * max(1.0, e.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 kernels are checked on a GPU")
@pytest.mark.parametrize("B", [1, 3, 5, 17])
def test_fast_depthwise_bfloat16_partial_stacks_and_bias_gradient(fast_depthwise, B):
    conv = nn.Conv2d(64, 64, 9, groups=64, padding="same").cuda()
    fast = fast_depthwise.FastDepthwiseConv2d(conv, "toeplitz")
    x = torch.randn(B, 64, 32, 32, device="cuda", requires_grad=True)
    grad_y = torch.randn(B, 64, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", torch.bfloat16):
        e, g = conv(x), fast(x)
    torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)
    for ge, gg in zip(torch.autograd.grad(e, (x, conv.weight, conv.bias), grad_y),
                      torch.autograd.grad(g, (x, conv.weight, conv.bias), grad_y)):
        torch.testing.assert_close(gg.float(), ge.float(), rtol=2e-2, atol=2e-2 * ge.abs().max().item())


@pytest.mark.slow
def test_fast_depthwise_in_a_convmixer_keeps_state_dict_and_results(fast_depthwise):
    torch.manual_seed(0)
    plain = randomize_(ConvMixer(8, 2, 5, 2, 10)).to(DEVICE).train()
    fast = ConvMixer(8, 2, 5, 2, 10).to(DEVICE).train()
    fast.load_state_dict(plain.state_dict())
    fast_depthwise.use_fast_depthwise(fast)
    assert isinstance(fast[3][0].fn[0], fast_depthwise.FastDepthwiseConv2d)
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 3, 12, 10, device=DEVICE)
    loss_plain, loss_fast = plain(x).square().sum(), fast(x).square().sum()
    torch.testing.assert_close(loss_fast, loss_plain)
    loss_plain.backward()
    loss_fast.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cpu" and not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_fast_depthwise_compiles_into_one_graph(fast_depthwise):
    # --fast --compile: the custom ops must not break the graph (fullgraph=True fails on any
    # break) and the compiled model must give the eager model's loss and gradients.
    torch.manual_seed(0)
    plain = randomize_(ConvMixer(8, 2, 5, 2, 10)).to(DEVICE).train()
    fast = ConvMixer(8, 2, 5, 2, 10).to(DEVICE).train()
    fast.load_state_dict(plain.state_dict())
    compiled = torch.compile(fast_depthwise.use_fast_depthwise(fast), fullgraph=True)
    x = torch.randn(4, 3, 12, 10, device=DEVICE)
    loss_plain, loss_fast = plain(x).square().sum(), compiled(x).square().sum()
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-3, atol=1e-4)   # 1e-3: TF32 on a GPU
    loss_plain.backward()
    loss_fast.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_benchmark_depthwise_breakdown_times_both_kernels(fast_depthwise):
    from fast import benchmark
    args = benchmark.parse_args(["--hdim", "2", "--ksize", "3", "--psize", "8", "--device", DEVICE])
    args.batch_size = 2
    default_rows = fast_depthwise.TOEPLITZ_ROWS
    timings = benchmark.depthwise_breakdown(args, torch.device(DEVICE), amp=None, repeats=1)
    toeplitz = [f"triton_toeplitz_{rows}rows" for rows in (32, default_rows, 256)]
    assert set(timings) == {f"{k}_{p}" for k in ("native", "triton_direct", *toeplitz)
                            for p in ("forward", "forward_backward")}
    assert all(v > 0 for v in timings.values())
    assert fast_depthwise.TOEPLITZ_ROWS == default_rows               # the default is back


def test_fast_depthwise_algorithm_must_fit(fast_depthwise):
    conv = nn.Conv2d(2, 2, 3, groups=2, padding="same")
    with pytest.raises(ValueError, match="algorithm"):
        fast_depthwise.FastDepthwiseConv2d(conv, "fft")(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="widths up to 32"):
        fast_depthwise.FastDepthwiseConv2d(conv, "toeplitz")(torch.randn(1, 2, 2, 33))
    assert fast_depthwise._algorithm(32, "auto") == "toeplitz"       # CIFAR-10 at p = 1
    assert fast_depthwise._algorithm(33, "auto") == "direct"


def check_kernels(code="import check_kernels, sys; sys.exit(check_kernels.main())"):
    """Run fast/check_kernels.py's checks in a fresh process without the Triton interpreter."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no CUDA toolchain (ptxas, cuobjdump) to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT / "fast", env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_fast_depthwise_kernels_compile_for_an_h100_without_spilling():
    # What the interpreter cannot show: compiled for sm_90, every launch of the tested shapes
    # builds, keeps its registers, fits shared memory, and "toeplitz" uses tensor cores.
    proc = check_kernels()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all kernels compile cleanly for sm_90" in proc.stdout
    design_card = [line.split() for line in proc.stdout.splitlines() if "(the design card)" in line]
    assert [row[0] for row in design_card] == ["depthwise_forward_toeplitz_kernel",
                                               "depthwise_weight_grad_toeplitz_kernel"]
    assert all(row[1] == "bf16" and int(row[3]) == 0 and int(row[6]) > 0 for row in design_card)
    norm = [line.split() for line in proc.stdout.splitlines() if "GELU -> BatchNorm" in line]
    assert [row[0] for row in norm] == ["plane_stats_kernel", "channel_stats_kernel", "normalize_kernel",
                                        "running_stats_kernel", "grad_sums_kernel", "grad_coefficients_kernel",
                                        "grad_input_kernel"]                # fast/gelu_batchnorm.py's
    assert all(row[1] == "bf16" and int(row[3]) == 0 for row in norm)


@pytest.mark.slow
def test_check_kernels_reports_spilled_registers():
    # Forced beyond TOEPLITZ_MAX_WIDTH, the float32 "toeplitz" kernels spill at W = 64.
    proc = check_kernels("import sys, torch, check_kernels\n"
                         "from check_kernels import fast_depthwise\n"
                         "fast_depthwise.TOEPLITZ_MAX_WIDTH = 64\n"
                         "case = ('W=64', 8, 16, 64, 9, torch.float32, 'toeplitz')\n"
                         "sys.exit(check_kernels.main([case], norm_cases=[]))")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "<- spills" in proc.stdout and "kernel(s) with problems" in proc.stdout


@pytest.mark.slow
def test_check_kernels_compiles_for_the_gpu_asked_for():
    # --arch reaches the compiler: a T4 (sm_75) has no bfloat16 tensor cores, an A100 (sm_80) has,
    # and a B200's (sm_100) are counted too, though its products compile to other (tcgen05) MMAs.
    case = "[('CIFAR-10 at p2', 64, 16, 16, 5, torch.bfloat16, 'auto')]"
    proc = check_kernels(f"import sys, torch, check_kernels\n"
                         f"main = lambda arch: check_kernels.main({case}, arch, norm_cases=[])\n"
                         f"sys.exit(main(75) + 2 * main(80) + 4 * main(100))")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    t4, rest = proc.stdout.split("target cuda sm_80")
    a100, b200 = rest.split("target cuda sm_100")
    assert "target cuda sm_75" in t4 and "<- no tensor-core instruction" in t4 and "problems for sm_75" in t4
    assert "all kernels compile cleanly for sm_80" in a100 and "<-" not in a100
    assert "all kernels compile cleanly for sm_100" in b200 and "<-" not in b200


def test_fast_depthwise_refuses_other_convolutions(fast_depthwise):
    with pytest.raises(ValueError, match="depthwise"):
        fast_depthwise.FastDepthwiseConv2d(nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="depthwise"):
        fast_depthwise.FastDepthwiseConv2d(nn.Conv2d(4, 4, 3, groups=4, padding=1))


def gelu_then_batchnorm(gelu_batchnorm, channels, seed=0):
    """nn.GELU -> nn.BatchNorm2d with random affine parameters and running statistics, and the fused
    module made from a copy of that BatchNorm2d."""
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        for t, (low, high) in zip([norm.weight, norm.bias, norm.running_mean, norm.running_var],
                                  [(0.5, 1.5), (-0.5, 0.5), (-0.2, 0.2), (0.5, 1.5)]):
            t.uniform_(low, high)
    fused = gelu_batchnorm.FusedGeluBatchNorm2d(copy.deepcopy(norm))
    return nn.Sequential(nn.GELU(), norm).to(DEVICE), fused.to(DEVICE)


def output_and_gradients(module, z, dy, residual=None):
    """The pair's or the fused module's output (+ residual, if given) and the gradients of z and the
    BatchNorm's weight and bias."""
    if isinstance(module, nn.Sequential):
        norm, y = module[1], module(z) if residual is None else module(z) + residual
    else:
        norm, y = module, module(z, residual=residual)
    return [y, *torch.autograd.grad(y, (z, norm.weight, norm.bias), dy)]


def assert_outputs_and_gradients_close(expected, got, rtol, atol, where=""):
    """Output and the input, weight and bias gradients against the pair's, each in the pair's dtype
    and shape; atol is relative to the largest value, where it exceeds 1."""
    for name, e, g in zip(["output", "grad_input", "grad_weight", "grad_bias"], expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(g.float(), e.float(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{where}{name}: {m}")


def buffers_of(module):
    norm = module[1] if isinstance(module, nn.Sequential) else module
    return [norm.running_mean, norm.running_var, norm.num_batches_tracked]


@pytest.mark.parametrize("B,C,H,W", [(4, 3, 5, 7), (3, 4, 32, 32), (2, 2, 40, 40), (1, 2, 1, 2)])
def test_fused_gelu_batchnorm_matches_gelu_then_batchnorm_float32(gelu_batchnorm, B, C, H, W):
    """Two training steps (the second normalizes with its own batch's statistics and moves the
    running ones again), then eval mode: the output, the gradients of the input, weight and bias,
    and the running statistics. 40 x 40 planes are larger than one program's block (1,024 values);
    (1, 2, 1, 2) has two values per channel, the fewest BatchNorm trains on."""
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, C)
    for step in range(2):
        z = (torch.randn(B, C, H, W, device=DEVICE) * 2 + 0.5).requires_grad_()
        dy = torch.randn(B, C, H, W, device=DEVICE)
        expected, got = output_and_gradients(pair, z, dy), output_and_gradients(fused, z, dy)
        assert_outputs_and_gradients_close(expected, got, rtol=1e-5, atol=1e-5, where=f"step {step}, ")
        for e, g in zip(buffers_of(pair), buffers_of(fused)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert fused.num_batches_tracked.item() == 2
    z = torch.randn(B, C, H, W, device=DEVICE)
    torch.testing.assert_close(fused.eval()(z), pair.eval()(z))


def test_fused_gelu_batchnorm_in_half_precision_normalizes_what_gelu_would_output(gelu_batchnorm):
    """16-bit input, as under autocast: GELU's output is rounded to float16 before BatchNorm sees
    it, and the fused kernels round it the same way. float16 takes the code path of bfloat16 and,
    unlike bfloat16, also runs in Triton's interpreter on a CPU."""
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 3)
    z = (torch.randn(4, 3, 8, 8, device=DEVICE) * 2).half().requires_grad_()
    dy = torch.randn(4, 3, 8, 8, device=DEVICE).half()
    assert_outputs_and_gradients_close(output_and_gradients(pair, z, dy), output_and_gradients(fused, z, dy),
                                       rtol=1e-2, atol=2e-3)
    for e, g in zip(buffers_of(pair), buffers_of(fused)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # The batch's statistics are those of GELU's float16 output, not of the float32 values before
    # rounding (their means differ by about 1e-5 here).
    _, mean, var = gelu_batchnorm.gelu_batch_norm(z.detach(), fused.weight, fused.bias, fused.eps)
    g = nn.functional.gelu(z.detach()).float()
    torch.testing.assert_close(mean, g.mean((0, 2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(var, g.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


def test_fused_gelu_batchnorm_reduces_a_batch_in_several_blocks(gelu_batchnorm, monkeypatch):
    """The per-channel kernels sum the per-plane statistics over the batch a block of images at a
    time (512 on a GPU): with blocks of 4, a batch of 10 takes two whole blocks and a partial one."""
    monkeypatch.setattr(gelu_batchnorm, "CHANNEL_BLOCK_IMAGES", 4)
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 3)
    z = (torch.randn(10, 3, 4, 5, device=DEVICE) * 2 + 0.5).requires_grad_()
    dy = torch.randn(10, 3, 4, 5, device=DEVICE)
    assert_outputs_and_gradients_close(output_and_gradients(pair, z, dy), output_and_gradients(fused, z, dy),
                                       rtol=1e-5, atol=1e-5)
    for e, g in zip(buffers_of(pair), buffers_of(fused)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("z_dtype", [torch.float32, torch.float16])
def test_fused_gelu_batchnorm_adds_the_skip_connection(gelu_batchnorm, z_dtype):
    """With a residual x: x + BatchNorm2d(GELU(z)), in the dtype that addition would have (a float16
    z with a float32 x gives float32), and x's gradient, the output's, in x's dtype; eval mode too.
    A residual of another shape is refused."""
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 3)
    z = (torch.randn(4, 3, 6, 5, device=DEVICE) * 2).to(z_dtype).requires_grad_()
    x = torch.randn(4, 3, 6, 5, device=DEVICE, requires_grad=True)
    dy = torch.randn(4, 3, 6, 5, device=DEVICE)
    y_pair, y_fused = pair(z) + x, fused(z, residual=x)
    expected = [y_pair, *torch.autograd.grad(y_pair, (z, x, pair[1].weight, pair[1].bias), dy)]
    got = [y_fused, *torch.autograd.grad(y_fused, (z, x, fused.weight, fused.bias), dy)]
    tolerance = 1e-5 if z_dtype == torch.float32 else 2e-3
    for name, e, g in zip(["output", "grad z", "grad x", "grad weight", "grad bias"], expected, got):
        assert g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance, msg=lambda m: f"{name}: {m}")
    for e, g in zip(buffers_of(pair), buffers_of(fused)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.eval()(z, residual=x), pair.eval()(z) + x)
    with pytest.raises(ValueError, match=r"residual of shape \(4, 3, 6, 4\) for an input of shape \(4, 3, 6, 5\)"):
        fused.train()(z, residual=x[..., :4])


def test_fused_gelu_batchnorm_does_its_per_channel_arithmetic_in_its_kernels(gelu_batchnorm):
    """The batch statistics, running-statistics updates and gradient coefficients are small kernels
    of the module's own (done with PyTorch ops, they took 29 launches a layer): the fused forward
    and backward run no PyTorch arithmetic at all. The pair and addition do."""
    from torch.profiler import profile
    arithmetic = {"aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::neg",
                  "aten::sum", "aten::mean", "aten::square", "aten::pow", "aten::rsqrt", "aten::lerp_",
                  "aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::cudnn_batch_norm",
                  "aten::cudnn_batch_norm_backward", "aten::gelu", "aten::gelu_backward"}
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 3)
    z = torch.randn(4, 3, 5, 5, device=DEVICE, requires_grad=True)
    x, dy = torch.randn(4, 3, 5, 5, device=DEVICE), torch.randn(4, 3, 5, 5, device=DEVICE)
    ran = {}
    for name, step in [("pair", lambda: pair(z) + x), ("fused", lambda: fused(z, residual=x))]:
        with profile() as prof:
            y = step()
            torch.autograd.grad(y, (z, *pair[1].parameters(), *fused.parameters()), dy, allow_unused=True)
        ran[name] = {event.name for event in prof.events()} & arithmetic
    assert ran["fused"] == set()
    assert {"aten::add", "aten::gelu", "aten::gelu_backward"} <= ran["pair"]


def assert_the_same_training_step(reference, model, x, loss_tolerance, grad_tolerance):
    """One forward and backward pass of each, in training mode: the same loss, gradients and (then)
    state_dict values, BatchNorm's running statistics among them."""
    loss_reference, loss = reference(x).square().sum(), model(x).square().sum()
    torch.testing.assert_close(loss, loss_reference, rtol=loss_tolerance, atol=loss_tolerance)
    loss_reference.backward()
    loss.backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=grad_tolerance, atol=grad_tolerance / 10,
                                   msg=lambda m: f"{name}: {m}")
    for (name, e), g in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_fused_gelu_batchnorm_in_a_convmixer_keeps_state_dict_and_results(gelu_batchnorm):
    """Swapped into a ConvMixer (patch embedding and both halves of each block, the skip connections'
    additions too): the same state_dict keys, the same Parameter and buffer objects (an optimizer made
    before the swap still trains it), the same loss, gradients and running statistics after a
    training step, and in eval mode."""
    torch.manual_seed(0)
    plain = randomize_(ConvMixer(8, 2, 5, 2, 10)).to(DEVICE).train()
    fused = copy.deepcopy(plain)
    before = fused.state_dict(keep_vars=True)
    gelu_batchnorm.use_fused_gelu_batch_norm(fused)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("FusedGeluBatchNorm2d") == 1 + 2 * 2 and kinds.count("Identity") == 5
    assert kinds.count("FusedResidual") == 2 and "Residual" not in kinds      # x + ... in the kernel
    assert "GELU" not in kinds and "BatchNorm2d" not in kinds
    after = fused.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    x = torch.randn(4, 3, 12, 10, device=DEVICE)
    assert_the_same_training_step(plain, fused, x, loss_tolerance=1e-5, grad_tolerance=1e-4)
    torch.testing.assert_close(fused.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)


def test_fused_gelu_batchnorm_takes_only_convmixers_pair(gelu_batchnorm):
    """Other activations and BatchNorms without affine parameters, running statistics or a momentum
    are left as they are; the module refuses them, and a batch with one value per channel."""
    relu = ConvMixer(8, 1, 3, 2, 10, activation=nn.ReLU)
    kinds = [type(m) for m in relu.modules()]
    assert [type(m) for m in gelu_batchnorm.use_fused_gelu_batch_norm(relu).modules()] == kinds
    for gelu, kwargs in [(nn.GELU(approximate="tanh"), {}), (nn.GELU(), dict(affine=False)),
                         (nn.GELU(), dict(track_running_stats=False)), (nn.GELU(), dict(momentum=None))]:
        pair = nn.Sequential(gelu, nn.BatchNorm2d(4, **kwargs))
        assert [type(m) for m in gelu_batchnorm.use_fused_gelu_batch_norm(pair)] == [nn.GELU, nn.BatchNorm2d]
        if kwargs:
            with pytest.raises(ValueError, match="not an affine BatchNorm2d with running statistics"):
                gelu_batchnorm.FusedGeluBatchNorm2d(pair[1])
    with pytest.raises(ValueError, match="more than 1 value per channel, got input of shape"):
        gelu_batchnorm.FusedGeluBatchNorm2d(nn.BatchNorm2d(2))(torch.randn(1, 2, 1, 1, device=DEVICE))


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cpu" and not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_fused_gelu_batchnorm_compiles_into_one_graph(gelu_batchnorm):
    """Both ops are torch.library ops: torch.compile(fullgraph=True) keeps them (and the running
    statistics' updates) in one graph, with the eager module's loss, gradients and statistics."""
    torch.manual_seed(0)
    eager = gelu_batchnorm.use_fused_gelu_batch_norm(randomize_(ConvMixer(8, 1, 3, 2, 10)).to(DEVICE).train())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    assert_the_same_training_step(eager, compiled, x, loss_tolerance=1e-4, grad_tolerance=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 kernels are checked on a GPU")
@pytest.mark.parametrize("B,skip", [(64, True), (512, False)])
def test_fused_gelu_batchnorm_cuda_only_matches_the_pair_in_bfloat16_autocast(gelu_batchnorm, B, skip):
    """ConvMixer-256's shapes at batch 64 (with the skip connection's addition) and 512 (without),
    with a bfloat16 input, as a convolution gives it under autocast: output, gradients and running
    statistics against GELU -> BatchNorm2d (+ x)."""
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 256)
    z = (torch.randn(B, 256, 32, 32, device="cuda") * 2).bfloat16().requires_grad_()
    x = torch.randn(B, 256, 32, 32, device="cuda").bfloat16() if skip else None
    dy = torch.randn(B, 256, 32, 32, device="cuda").bfloat16()
    with torch.autocast("cuda", torch.bfloat16):
        expected, got = output_and_gradients(pair, z, dy, x), output_and_gradients(fused, z, dy, x)
    assert_outputs_and_gradients_close(expected, got, rtol=2e-2, atol=2e-2)
    for e, g in zip(buffers_of(pair), buffers_of(fused)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
