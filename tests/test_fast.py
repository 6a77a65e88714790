"""fast/: the training step as a CUDA graph and its seam to train_cifar.py, the benchmark, and the
Triton depthwise convolution against nn.Conv2d (on a CPU in Triton's interpreter; the bfloat16 and
CUDA-graph checks need a GPU).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train_cifar
from convmixer import ConvMixer
from test_convmixer import randomize_
from helpers import DEVICE, FAKE, ROOT, read_log, run_main


def a_step_setup(seed=0):
    torch.manual_seed(seed)
    args = train_cifar.parse_args(["--hdim", "16", "--depth", "1", "--psize", "4", "--device", DEVICE])
    model = train_cifar.build_model(train_cifar.model_config(args)).to(DEVICE)
    return model, train_cifar.make_optimizer(model, args), nn.CrossEntropyLoss(label_smoothing=0.1)


def test_the_graph_steps_body_computes_what_train_step_computes():
    """fast/step.py's GraphStep, run eagerly, against train_cifar.train_step: the same weights,
    AdamW state, losses and correct counts after a few steps, bit for bit."""
    from fast.step import GraphStep
    model, optimizer, criterion = a_step_setup()
    reference, reference_optimizer, _ = a_step_setup()
    step = GraphStep(model, optimizer, criterion, amp=None, clip=0.05, graph=False)     # a clip that bites
    scaler = torch.amp.GradScaler(DEVICE, enabled=False)
    g = torch.Generator().manual_seed(1)
    for lr in (0.01, 0.02, 0.005):
        x = torch.randn(8, 3, 32, 32, generator=g).to(DEVICE)
        t = nn.functional.one_hot(torch.randint(10, (8,), generator=g), 10).float().to(DEVICE)
        loss, correct = step(x, t, lr)
        expected = train_cifar.train_step(reference, reference_optimizer, scaler, criterion, x, t, lr, None, 0.05)
        assert torch.equal(loss, expected[0]) and torch.equal(correct, expected[1])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    for a, b in zip(optimizer.state.values(), reference_optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_cuda_only_graph_replays_what_the_eager_step_does():
    """The captured graph against the eager body in bfloat16 autocast, with the Triton kernels: close
    weights after several replays (the warm-up before the capture leaves no trace), and the loss of
    each step."""
    from fast.depthwise import use_fast_depthwise
    from fast.step import GraphStep
    runs = []
    for graph in (False, True):
        model, optimizer, criterion = a_step_setup()
        use_fast_depthwise(model)
        step = GraphStep(model, optimizer, criterion, amp=torch.bfloat16, clip=1.0, graph=graph)
        g = torch.Generator().manual_seed(1)
        losses = []
        for lr in (0.01, 0.02, 0.005, 0.01):
            x = torch.randn(64, 3, 32, 32, generator=g).cuda()
            t = nn.functional.one_hot(torch.randint(10, (64,), generator=g), 10).float().cuda()
            losses.append(step(x, t, lr)[0].item())
        runs.append((losses, [v.float() for v in model.state_dict().values()]))
    (eager_losses, eager), (graph_losses, graphed) = runs
    assert graph_losses == pytest.approx(eager_losses, rel=2e-2)
    assert all(torch.allclose(a, b, rtol=5e-2, atol=5e-3) for a, b in zip(eager, graphed))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast on a GPU")
def test_float16_cuda_only_trains_as_bfloat16_does(tmp_path):
    finals = [run_main("--hdim", "64", "--depth", "2", "--ksize", "9", "--psize", "2", "--epochs", "2",
                       "--batch-size", "128", "--fake-data", "2048", "--no-fast", "--amp-dtype", dtype,
                       "--device", "cuda", "--out", tmp_path / dtype) for dtype in ("bfloat16", "float16")]
    losses = [[r["train_loss"] for r in read_log(tmp_path / d) if "train_loss" in r] for d in ("bfloat16", "float16")]
    assert losses[1] == pytest.approx(losses[0], rel=0.05) and finals[1]["final"]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path on CUDA")
def test_the_fast_path_cuda_only_stopped_and_resumed_ends_as_the_whole_run_does(tmp_path, monkeypatch):
    flags = ["--hdim", "64", "--depth", "2", "--ksize", "9", "--psize", "2", "--epochs", "3", "--batch-size", "64",
             "--fake-data", "2048", "--fast", "--device", "cuda"]
    run_main(*flags, "--out", tmp_path / "whole")
    epoch_batches = train_cifar.epoch_batches

    def stop_in_epoch_2(args, data, epoch, device):
        for i, batch in enumerate(epoch_batches(args, data, epoch, device)):
            if (epoch, i) == (1, 5):
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(train_cifar, "epoch_batches", stop_in_epoch_2)
    with pytest.raises(SystemExit):
        run_main(*flags, "--out", tmp_path / "pieces")
    monkeypatch.setattr(train_cifar, "epoch_batches", epoch_batches)
    run_main("--resume", "--out", tmp_path / "pieces")
    logs = [read_log(tmp_path / d) for d in ("whole", "pieces")]
    assert logs[0][0]["config"]["fast"] is True
    assert [r["train_loss"] for r in logs[1] if "train_loss" in r] == pytest.approx(
        [r["train_loss"] for r in logs[0] if "train_loss" in r], rel=1e-2)


def test_a_gpu_whose_kernels_disagree_takes_the_plain_path_and_says_so(tmp_path, monkeypatch, capsys):
    """make_fast_step's answer when this GPU's kernels fail their check (forced here) is the run's
    note, and the run trains the plain path (per-image augmentation, train_step)."""
    import fast.step
    note = "plain path: the Triton depthwise kernels disagree with nn.Conv2d on this GPU (weight gradient off)"
    monkeypatch.setattr(fast.step, "make_fast_step", lambda *a: (None, note))
    run_main(*FAKE, "--fake-data", "100", "--batch-size", "50", "--epochs", "1", "--fast", "--out", tmp_path / "o")
    lines = capsys.readouterr().out.splitlines()
    assert "(fast path)" not in lines[0] and lines[1] == note
    assert read_log(tmp_path / "o")[0]["config"]["fast"] is False


def test_the_fast_step_is_the_readable_one_off_cuda():
    from fast.step import make_fast_step
    model, optimizer, criterion = a_step_setup()
    args = train_cifar.parse_args(["--device", "cpu", "--fast"])
    assert make_fast_step(model, optimizer, criterion, None, args, torch.device("cpu")) == (None, None)


def test_a_model_without_depthwise_convolutions_takes_the_plain_path_with_a_note():
    """Nothing of the GPU is touched before the answer, so a CPU can ask as for CUDA."""
    pytest.importorskip("triton")
    from fast.step import make_fast_step
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    optimizer = torch.optim.AdamW(model.parameters())
    args = train_cifar.parse_args(["--device", "cpu", "--psize", "4"])
    step, note = make_fast_step(model, optimizer, nn.CrossEntropyLoss(), None, args, torch.device("cuda"))
    assert step is None and note == "plain path: the model has no depthwise convolution for the Triton kernels"


@pytest.mark.parametrize("k, side, wrong", [
    (17, 16, None), (9, 32, None), (5, 16, "weight gradient"), (5, 16, "output"),
    *[pytest.param(k, side, None, marks=pytest.mark.slow) for k, side in [(19, 16), (31, 16), (33, 32)]]])
def test_check_against_conv2d_passes_right_kernels_and_names_a_wrong_one(fast_depthwise, monkeypatch, k, side, wrong):
    """The startup check at the run's shapes: kernels wider than the "toeplitz" tile (k 17 to 31 on
    16 x 16 at p 2, the widest the trainer allows there; k 33 on 32 x 32 at p 1), where "toeplitz"
    once summed garbage into the weight gradient, pass; a kernel made wrong is named."""
    real = fast_depthwise.depthwise_conv
    if wrong == "weight gradient":
        monkeypatch.setattr(fast_depthwise, "depthwise_conv_weight_grad", lambda x, dy, k, *a: torch.zeros(
            x.shape[1], 1, k, k))
    if wrong == "output":
        monkeypatch.setattr(fast_depthwise, "depthwise_conv", lambda *a: real(*a) * 1.5)
    problem = fast_depthwise.check_against_conv2d(nn.Conv2d(2, 2, k, groups=2, padding="same"), (2, 2, side, side), None)
    assert problem is None if wrong is None else problem.startswith(f"{wrong} off by"), problem


def test_the_kernels_launch_on_their_inputs_device(fast_depthwise, monkeypatch):
    """Triton launches on the current CUDA device: each op enters its input's (--device cuda:1 needs
    it); on a CPU there is nothing to enter."""
    entered = []
    monkeypatch.setattr(fast_depthwise.torch.cuda, "device", lambda device: entered.append(device))

    class OnCuda1:
        device = torch.device("cuda", 1)
    fast_depthwise.on_device_of(OnCuda1())
    assert entered == [torch.device("cuda", 1)]
    calls, real = [], fast_depthwise.on_device_of
    monkeypatch.setattr(fast_depthwise, "on_device_of", lambda x: calls.append(x.device) or real(x))
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    fast_depthwise.FastDepthwiseConv2d(nn.Conv2d(2, 2, 3, groups=2, padding="same"))(x).sum().backward()
    assert calls == [torch.device("cpu")] * 3                       # forward, input and weight gradients


@pytest.mark.slow
def test_benchmark_measures_both_paths_at_both_batch_sizes_in_one_file(tmp_path):
    from fast import benchmark
    result = benchmark.benchmark(benchmark.parse_args(["--hdim", "16", "--depth", "1", "--ksize", "3", "--psize",
                                                        "4", "--batch-sizes", "16", "32", "--steps", "2",
                                                        "--workers", "0", "--device", "cpu", "--out", str(tmp_path)]))
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved == json.loads(json.dumps(result)) and saved["config"]["hdim"] == 16
    for b in (16, 32):
        assert set(saved[f"batch_{b}"]) == {"plain", "fast"}
        for path, m in saved[f"batch_{b}"].items():
            assert m["img_s"] > 0 and m["model_only_img_s"] > 0 and m["profile"]["top"], (b, path)
        assert saved[f"batch_{b}"]["fast"]["augment_only_img_s"] > 0
        assert saved[f"batch_{b}"]["fast"]["speedup_over_plain"] > 0


def test_train_cifar_imports_fast_only_where_a_run_asks_for_it():
    """fast/ is imported by train_cifar.py in two places, both when --fast is on: the batches and the step."""
    import ast
    tree = ast.parse((ROOT / "train_cifar.py").read_text())
    top = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [line for line in top if "fast" in line]
    inner = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("fast")]
    assert sorted(inner) == ["fast.augment", "fast.step"]
    result = subprocess.run([sys.executable, "-c", "import sys, train_cifar; "
                             "sys.exit(any(m.startswith('fast') for m in sys.modules))"], cwd=ROOT, capture_output=True)
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
    # A kernel row wider than the tile: "direct", up to the widest the trainer allows (p 2, p 1).
    assert [fast_depthwise._algorithm(w, "auto", k) for w, k in [(16, 16), (16, 17), (16, 31), (32, 32), (32, 33),
                                                                 (32, 63)]] == ["toeplitz", *["direct"] * 2,
                                                                                "toeplitz", *["direct"] * 2]
    with pytest.raises(ValueError, match="kernels no wider than its tile"):
        fast_depthwise.FastDepthwiseConv2d(nn.Conv2d(2, 2, 17, groups=2, padding="same"), "toeplitz")(
            torch.randn(1, 2, 16, 16))


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


@pytest.mark.slow
def test_check_kernels_reports_spilled_registers():
    # Forced beyond TOEPLITZ_MAX_WIDTH, the float32 "toeplitz" kernels spill at W = 64.
    proc = check_kernels("import sys, torch, check_kernels\n"
                         "from check_kernels import fast_depthwise\n"
                         "fast_depthwise.TOEPLITZ_MAX_WIDTH = 64\n"
                         "case = ('W=64', 8, 16, 64, 9, torch.float32, 'toeplitz')\n"
                         "sys.exit(check_kernels.main([case]))")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "<- spills" in proc.stdout and "kernel(s) with problems" in proc.stdout


@pytest.mark.slow
def test_check_kernels_compiles_for_the_gpu_asked_for():
    # --arch reaches the compiler: a T4 (sm_75) has no bfloat16 tensor cores, an A100 (sm_80) has,
    # and a B200's (sm_100) are counted too, though its products compile to other (tcgen05) MMAs.
    case = "[('CIFAR-10 at p2', 64, 16, 16, 5, torch.bfloat16, 'auto')]"
    proc = check_kernels(f"import sys, torch, check_kernels\n"
                         f"main = lambda arch: check_kernels.main({case}, arch)\n"
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


