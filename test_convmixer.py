"""The test suite: `pytest -q` (runs on CPU in a few minutes).

Model tests use only torch. Trainer tests run train_cifar.py as a user would, on a small slice
of the real CIFAR-10 when CIFAR10_ROOT (or ./data) holds it, else on torchvision's FakeData.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import convmixer
from convmixer import ConvMixer, Residual, from_timm, to_timm

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# Independent oracles, written here so the model is checked against code that is not its own.

def tweetable_convmixer(h, d, k, p, n):
    """The paper's 280-character ConvMixer (official README's `ConvMixr`), in the same style.

    Different nesting (stem and each block's 1x1 part are their own Sequentials), padding k//2
    instead of "same", a Residual defined on the fly: only the parameters must agree.
    """
    S, C = nn.Sequential, nn.Conv2d
    A = lambda x: S(x, nn.GELU(), nn.BatchNorm2d(h))  # noqa: E731
    R = type("R", (S,), {"forward": lambda s, x: s[0](x) + x})
    return S(A(C(3, h, p, stride=p)),
             *[S(R(A(C(h, h, k, groups=h, padding=k // 2))), A(C(h, h, 1))) for _ in range(d)],
             nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(h, n))


class TimmLayoutConvMixer(nn.Module):
    """A ConvMixer with timm's attribute names (stem / blocks / pooling / head)."""

    def __init__(self, dim, depth, kernel_size, patch_size, num_classes):
        super().__init__()
        bn_act = lambda conv: [conv, nn.GELU(), nn.BatchNorm2d(dim)]  # noqa: E731
        self.stem = nn.Sequential(*bn_act(nn.Conv2d(3, dim, patch_size, stride=patch_size)))

        class Res(nn.Module):
            def __init__(self, fn):
                super().__init__()
                self.fn = fn

            def forward(self, x):
                return self.fn(x) + x

        self.blocks = nn.Sequential(*[
            nn.Sequential(Res(nn.Sequential(*bn_act(nn.Conv2d(dim, dim, kernel_size, groups=dim,
                                                              padding="same")))),
                          *bn_act(nn.Conv2d(dim, dim, 1)))
            for _ in range(depth)])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.pooling(self.blocks(self.stem(x))))


def randomize_(model, seed=0):
    """Random weights and BatchNorm statistics, so that comparisons in eval mode mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# convmixer.py

def test_module_imports_only_torch():
    source = (HERE / "convmixer.py").read_text()
    imports = [line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from "))]
    assert imports and set(imports) == {"torch"}


@pytest.mark.parametrize("dim,depth,k,p,hw", [
    (16, 0, 3, 1, (8, 8)), (16, 1, 9, 7, (224, 224)), (24, 2, 4, 3, (31, 29)),
    (8, 3, 5, 2, (17, 40)), (32, 2, 8, 5, (5, 5)), (8, 1, 1, 1, (1, 1)),
])
def test_output_shapes_and_patch_grid(dim, depth, k, p, hw):
    model = ConvMixer(dim, depth, kernel_size=k, patch_size=p, n_classes=7).eval()
    x = torch.randn(2, 3, *hw)
    assert model(x).shape == (2, 7)
    features = model[:3 + depth](x)                                  # (B, dim, H//p, W//p)
    assert features.shape == (2, dim, hw[0] // p, hw[1] // p)


def test_border_rows_that_do_not_fill_a_patch_are_dropped():
    model = ConvMixer(8, 1, kernel_size=3, patch_size=3, n_classes=4).eval()
    x = torch.randn(1, 3, 31, 29)
    y = x.clone()
    y[:, :, 30:, :] = 99.0                                           # 31 = 10*3 + 1: row 30 unused
    y[:, :, :, 27:] = -99.0                                          # 29 = 9*3 + 2: cols 27-28 unused
    torch.testing.assert_close(model(x), model(y))


@pytest.mark.parametrize("build,expected", [
    (convmixer.convmixer_cifar10, 706_570),
    (convmixer.convmixer_1536_20, 51_625_960),
    (convmixer.convmixer_768_32, 21_110_248),
])
def test_published_parameter_counts(build, expected):
    assert n_params(build()) == expected


def test_presets_have_published_settings():
    m = convmixer.convmixer_768_32()
    assert m[0].kernel_size == (7, 7) and m[3][0].fn[0].kernel_size == (7, 7)
    assert isinstance(m[1], nn.ReLU) and isinstance(m[3][0].fn[1], nn.ReLU)
    m = convmixer.convmixer_1024_20()
    assert m[0].stride == (14, 14) and m[3][0].fn[0].kernel_size == (9, 9) and len(m) == 20 + 6
    m = convmixer.convmixer_cifar10()
    assert m[0].stride == (1, 1) and m[-1].out_features == 10 and isinstance(m[1], nn.GELU)


def test_state_dict_keys_are_the_published_layout():
    depth = 3
    keys = set(ConvMixer(16, depth, 5, 2, 10).state_dict())
    expected = {"0.weight", "0.bias", "2.weight", "2.bias", "2.running_mean", "2.running_var",
                "2.num_batches_tracked", f"{depth + 5}.weight", f"{depth + 5}.bias"}
    for i in range(3, 3 + depth):
        expected |= {f"{i}.0.fn.0.weight", f"{i}.0.fn.0.bias", f"{i}.1.weight", f"{i}.1.bias"}
        for bn in (f"{i}.0.fn.2", f"{i}.3"):
            expected |= {f"{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                               "num_batches_tracked")}
    assert keys == expected


def test_structure_residual_wraps_only_the_depthwise_part():
    dim, depth = 16, 4
    model = ConvMixer(dim, depth, 5, 2, 10)
    assert type(model) is nn.Sequential and len(model) == depth + 6
    for block in model[3:3 + depth]:
        residual, pointwise = block[0], block[1]
        assert isinstance(residual, Residual)
        depthwise = residual.fn[0]
        assert depthwise.groups == dim and depthwise.kernel_size == (5, 5)
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
        assert not any(isinstance(m, Residual) for m in block[1:].modules())
    assert isinstance(model[-3], nn.AdaptiveAvgPool2d) and isinstance(model[-1], nn.Linear)


def test_every_conv_is_followed_by_activation_then_batchnorm():
    leaves = [m for m in ConvMixer(8, 3, 3, 2, 10).modules() if not list(m.children())]
    convs = [i for i, m in enumerate(leaves) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 3
    for i in convs:
        assert isinstance(leaves[i + 1], nn.GELU) and isinstance(leaves[i + 2], nn.BatchNorm2d)


def test_residual_adds_its_input():
    fn = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(Residual(fn)(x), fn(x) + x)


def move_by_order(source, target):
    """Copy source's state into target, pairing entries in order; strict load checks the keys."""
    src, dst = source.state_dict(), target.state_dict()
    assert [t.shape for t in src.values()] == [t.shape for t in dst.values()]
    target.load_state_dict(dict(zip(dst.keys(), src.values())), strict=True)


@pytest.mark.parametrize("h,d,k,p", [(16, 2, 9, 1), (12, 3, 5, 3), (8, 1, 3, 7)])
def test_matches_the_tweetable_model_both_ways(h, d, k, p):
    ours, tweet = ConvMixer(h, d, k, p, 10), tweetable_convmixer(h, d, k, p, 10)
    x = torch.randn(2, 3, 29, 32)
    randomize_(ours, seed=1)
    move_by_order(ours, tweet.eval())
    torch.testing.assert_close(tweet(x), ours(x), rtol=0, atol=0)
    randomize_(tweet, seed=2)
    move_by_order(tweet, ours)
    torch.testing.assert_close(ours(x), tweet(x), rtol=0, atol=0)


def test_timm_layout_round_trip():
    dim, depth, k, p = 16, 3, 7, 2
    timm_model = randomize_(TimmLayoutConvMixer(dim, depth, k, p, 10), seed=3)
    ours = ConvMixer(dim, depth, k, p, 10).eval()
    ours.load_state_dict(from_timm(timm_model.state_dict()), strict=True)
    x = torch.randn(2, 3, 20, 18)
    torch.testing.assert_close(ours(x), timm_model(x), rtol=0, atol=0)

    randomize_(ours, seed=4)
    back = TimmLayoutConvMixer(dim, depth, k, p, 10).eval()
    back.load_state_dict(to_timm(ours.state_dict()), strict=True)
    torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


def test_from_timm_accepts_checkpoints_and_the_published_layout():
    timm_sd = TimmLayoutConvMixer(8, 2, 3, 2, 10).state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in timm_sd.items()}, "epoch": 3}
    ConvMixer(8, 2, 3, 2, 10).load_state_dict(from_timm(wrapped), strict=True)
    published = ConvMixer(8, 2, 3, 2, 10).state_dict()
    assert from_timm(published).keys() == published.keys()


def test_conversion_rejects_foreign_keys():
    with pytest.raises(ValueError, match="encoder.weight"):
        from_timm({"encoder.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="stem.0.weight"):
        to_timm({"stem.0.weight": torch.zeros(1)})


def test_gradients_reach_every_parameter():
    model = ConvMixer(8, 2, 3, 2, 10)
    model(torch.randn(4, 3, 12, 12)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_small_model_fits_random_images():
    torch.manual_seed(0)
    model = ConvMixer(32, 2, kernel_size=3, patch_size=2, n_classes=10)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_torch_export():
    model = randomize_(ConvMixer(8, 2, 5, 2, 10))
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("name,kwargs", [
    ("dim", dict(dim=0)), ("dim", dict(dim=2.5)), ("dim", dict(dim=True)),
    ("depth", dict(depth=-1)), ("depth", dict(depth="8")),
    ("kernel_size", dict(kernel_size=0)), ("patch_size", dict(patch_size=-7)),
    ("n_classes", dict(n_classes=0)), ("in_chans", dict(in_chans=0)),
    ("activation", dict(activation="gelu")),
])
def test_bad_arguments_raise_value_error_naming_them(name, kwargs):
    args = dict(dim=8, depth=1, kernel_size=3, patch_size=2, n_classes=10) | kwargs
    with pytest.raises(ValueError, match=name):
        ConvMixer(**args)


# ---------------------------------------------------------------------------------------------
# train_cifar.py, run as a user runs it

def cifar10_root():
    """Where the real CIFAR-10 is (CI unpacks it and sets CIFAR10_ROOT), or None."""
    for root in (os.environ.get("CIFAR10_ROOT"), str(HERE / "data")):
        if root and (Path(root) / "cifar-10-batches-py" / "test_batch").exists():
            return root
    return None


REAL_DATA = cifar10_root()
DATA = ["--data", REAL_DATA] if REAL_DATA else ["--fake-data", "1000"]
TINY = ["--hdim", "32", "--depth", "2", "--ksize", "5", "--psize", "2", "--epochs", "3",
        "--batch-size", "128", "--device", "cpu", "--seed", "0", *DATA]
TINY += ["--subset", "3000"] if REAL_DATA else []


def run_script(*args, check=True, timeout=600):
    result = subprocess.run([sys.executable, str(HERE / "train_cifar.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def without_timings(records):
    timing = {"epoch_seconds", "images_per_second", "wall_seconds"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records
            if "train_loss" in r or r.get("final")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_script(*TINY, "--workers", "0", "--out", out)
    return out, result


def test_training_run_writes_its_log_and_model(reference_run):
    out, result = reference_run
    log = read_log(out)
    assert set(log[0]) >= {"config", "versions", "device"} and log[0]["config"]["hdim"] == 32
    epochs = [r for r in log if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    for r in epochs:
        assert set(r) >= {"epoch", "train_loss", "train_acc", "test_acc", "lr", "epoch_seconds",
                          "images_per_second"}
    final = log[-1]
    assert final["final"] and set(final) >= {"test_acc", "test_acc_flip_tta", "wall_seconds", "device"}
    assert final["test_acc"] == epochs[-1]["test_acc"]               # the last epoch's, not the best
    assert epochs[-1]["lr"] == 0.0 and max(r["lr"] for r in epochs) <= 0.01
    assert f"final test accuracy {final['test_acc']:.2f}%" in result.stdout

    saved = torch.load(out / "model.pt", weights_only=True)
    c = saved["config"]
    assert set(c) >= {"hdim", "depth", "ksize", "psize", "n_classes", "mean", "std"}
    model = ConvMixer(c["hdim"], c["depth"], c["ksize"], c["psize"], c["n_classes"])
    model.load_state_dict(saved["state_dict"], strict=True)
    assert (out / "last.pt").exists() and not list(out.glob("*.tmp"))


@pytest.mark.skipif(REAL_DATA is None, reason="needs the real CIFAR-10 (set CIFAR10_ROOT)")
def test_tiny_model_learns_real_cifar10(reference_run):
    assert read_log(reference_run[0])[-1]["test_acc"] > 25.0         # chance is 10%


def test_eval_reproduces_the_logged_accuracy(reference_run):
    out, _ = reference_run
    result = run_script("--eval", out / "model.pt", "--device", "cpu", *DATA)
    assert f"test accuracy {read_log(out)[-1]['test_acc']:.2f}%" in result.stdout


def test_same_seed_same_run_with_any_number_of_workers(reference_run, tmp_path):
    run_script(*TINY, "--workers", "2", "--out", tmp_path / "again")
    assert without_timings(read_log(tmp_path / "again")) == without_timings(read_log(reference_run[0]))


def test_interrupt_then_resume_equals_uninterrupted(reference_run, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(HERE / "train_cifar.py"), *TINY, "--workers", "0",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "log.jsonl").exists() and '"epoch": 1' in (out / "log.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)                                  # during epoch 2
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stdout + stderr
    assert "--resume --out" in stderr and "Traceback" not in stderr
    assert not (out / "model.pt").exists()

    result = run_script("--resume", "--out", out, "--workers", "0", *DATA)
    log = read_log(out)
    assert any(r.get("resumed") for r in log), "the log must show the resume"
    assert without_timings(log) == without_timings(read_log(reference_run[0]))
    assert "final test accuracy" in result.stdout


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    result = run_script("--hdim", "16", "--depth", "1", "--psize", "4", "--epochs", "1",
                        "--batch-size", "100", "--fake-data", "400", "--device", "cpu",
                        "--workers", "0", "--lr", "1e30", "--out", tmp_path / "o", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "loss became nan at epoch 1, step" in result.stderr


def test_missing_data_without_network_says_where_the_files_go(tmp_path, monkeypatch):
    import torchvision
    import train_cifar
    # A local port that refuses connections stands in for "no network".
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(train_cifar.Fail, match="cifar-10-batches-py") as e:
        train_cifar.load_cifar10(str(tmp_path / "empty"), train=True)
    assert str(tmp_path / "empty") in str(e.value)


@pytest.mark.parametrize("argv,expected", [
    (["--hdim", "0"], "--hdim"), (["--depth", "-1"], "--depth"), (["--ksize", "0"], "--ksize"),
    (["--psize", "-2"], "--psize"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--lr", "-1"], "--lr"), (["--reprob", "2"], "--reprob"),
    (["--subset", "0"], "--subset"), (["--subset", "60000"], "--subset"),
    (["--val", "50000"], "--val"), (["--subset", "49000", "--val", "2000"], "--subset"),
    (["--subset", "100", "--batch-size", "128"], "--batch-size"),
    (["--workers", "-1"], "--workers"), (["--device", "nonsense"], "--device"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--resume"], "--resume"),
])
def test_bad_flags_fail_at_start_naming_the_flag(argv, expected, capsys):
    import train_cifar
    with pytest.raises(SystemExit) as e:
        train_cifar.parse_args(argv)
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_existing_out_and_bad_checkpoints_fail_naming_the_file(reference_run, tmp_path):
    out, _ = reference_run
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    mismatched = tmp_path / "mismatched.pt"
    saved = torch.load(out / "model.pt", weights_only=True)
    torch.save({**saved, "config": {**saved["config"], "hdim": 48}}, mismatched)
    cases = [
        (["--out", out], f"--out {out}"),
        (["--resume", "--out", tmp_path / "none"], "last.pt"),
        (["--eval", tmp_path / "missing.pt"], "missing.pt"),
        (["--eval", garbage], "garbage.pt"),
        (["--eval", mismatched, "--fake-data", "10"], "mismatched.pt"),
    ]
    for argv, expected in cases:
        result = run_script(*argv, "--device", "cpu", check=False, timeout=120)
        assert result.returncode != 0, argv
        assert expected in result.stderr and "Traceback" not in result.stderr, (argv, result.stderr)
    assert not (tmp_path / "none").exists()


def test_one_cycle_schedule():
    import train_cifar
    lr = train_cifar.one_cycle_lr
    assert lr(0.0, 0.01) == 0 and lr(0.2, 0.01) == pytest.approx(0.005)
    assert lr(0.4, 0.01) == pytest.approx(0.01) and lr(0.8, 0.01) == pytest.approx(0.0005)
    assert lr(1.0, 0.01) == pytest.approx(0.0)
