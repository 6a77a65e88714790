"""train_cifar.py as a user runs it (a tiny ConvMixer on a slice of CIFAR-10, or on FakeData
without it), its flags and errors, and the recipe element by element: each test pins one element
by its effect (tools/mutants.py checks that these tests notice deliberate bugs).
"""
import json
import re
import shutil

import pytest
import torch
from torch import nn

import train_cifar
from convmixer import ConvMixer
from helpers import (CIFAR10_MEAN, CIFAR10_STD, DATA, FAKE, REAL_DATA, ROOT, as_on_a_gpu, error_lines_of_main,
                     read_log, run_main, run_script, sample_images, storage_locations)


# ---------------------------------------------------------------------------------------------
# Settings

def test_defaults_are_the_papers_cifar10_recipe():
    a = train_cifar.parse_args(["--device", "cpu"])
    assert (a.hdim, a.depth, a.ksize, a.psize, a.epochs, a.batch_size) == (256, 8, 9, 1, 200, 64)
    assert (a.lr, a.wd, a.eps, a.clip, a.label_smoothing, a.amp_dtype) == (0.01, 0.01, 1e-3, 1.0, 0.1, "float32")
    assert (a.scale, a.ra_n, a.ra_m, a.ra_mstd, a.ra_p) == (0.75, 2, 9, 0.5, 0.5)
    assert (a.mixup, a.cutmix, a.reprob, a.eval_every, a.fast) == (0.5, 0.5, 0.25, 10, False)
    optimizer = train_cifar.make_optimizer(ConvMixer(8, 1, 3, 4), a)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)


def test_the_short_recipe_is_the_official_scripts_quick_setting_and_a_given_flag_wins():
    paper, short = (train_cifar.parse_args(["--device", "cpu", *f]) for f in ([], ["--recipe", "short"]))
    assert (short.hdim, short.depth, short.ksize, short.psize, short.epochs, short.batch_size) == (256, 8, 5, 2, 25, 512)
    assert (short.lr, short.wd, short.scale, short.mixup, short.cutmix, short.reprob) == (0.05, 0.005, 1.0, 0, 0, 0)
    assert (short.ra_n, short.ra_m, short.ra_mstd, short.ra_p) == (2, 4.0, 0.0, 1.0)
    assert (short.label_smoothing, short.clip, short.eps) == (paper.label_smoothing, paper.clip, paper.eps)
    tuned = train_cifar.parse_args(["--device", "cpu", "--recipe", "short", "--lr", "0.02", "--val", "5000"])
    assert (tuned.lr, tuned.wd, tuned.n_train) == (0.02, 0.005, 45_000)


@pytest.mark.parametrize("argv,expected", [
    (["--hdim", "0"], "--hdim"), (["--depth", "-1"], "--depth"), (["--ksize", "0"], "--ksize"),
    (["--psize", "-2"], "--psize"), (["--psize", "64"], "--psize"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--lr", "-1"], "--lr"), (["--reprob", "2"], "--reprob"),
    (["--subset", "0"], "--subset"), (["--subset", "60000"], "--subset"), (["--val", "50000"], "--val"),
    (["--subset", "49000", "--val", "2000"], "--subset"), (["--subset", "100", "--batch-size", "128"], "--batch-size"),
    (["--workers", "-1"], "--workers"), (["--eval-every", "-1"], "--eval-every"), (["--ra-m", "11"], "--ra-m"),
    (["--ra-p", "1.5"], "--ra-p"), (["--seed", "99999999999999999999"], "--seed"), (["--lr", "inf"], "--lr"),
    (["--wd", "nan"], "--wd"), (["--psize", "4", "--ksize", "16"], "--ksize"), (["--device", "nonsense"], "--device"),
    (["--device", "mps"] if not torch.backends.mps.is_available() else ["--device", "nonsense"], "--device"),
    (["--resume"], "--resume"), (["--resume", "--out", "x", "--lr", "0.1"], "--lr"),
    (["--resume", "--out", "x", "--eval", "y"], "--eval"),
])
def test_bad_flags_fail_at_start_naming_the_flag(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        train_cifar.parse_args(argv)
    error = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(error) == 1 and error[0].startswith("train_cifar.py: error: "), error
    assert expected in error[0], error


def test_every_flag_with_a_bad_value_fails_in_one_line_naming_it(capsys):
    """A sweep: each numeric flag with values a user might type by mistake either works or is
    refused at start with one line that names it."""
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--help"])
    flags = re.findall(r"^  (--[a-z-]+) [A-Z_]+", capsys.readouterr().out, re.M)
    assert len(flags) > 20
    refused = 0
    for flag in flags:
        for value in ["abc", "nan", "inf", "-1", "-1e9", "1e30", "99999999999999999999"]:
            try:
                train_cifar.parse_args([flag, value, "--device", "cpu"])
            except SystemExit as e:
                error = capsys.readouterr().err.strip().splitlines()
                assert e.code == 2 and len(error) == 1 and flag in error[0], (flag, value, error)
                refused += 1
    assert refused > 100


def test_a_gpu_that_is_not_here_is_one_line_naming_it(monkeypatch, capsys):
    as_on_a_gpu(monkeypatch)
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--device", "cuda:1"])
    assert "error: --device cuda:1: there is no cuda device 1 here (1 in all, numbered from 0)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("machine, flags, expected", [
    ((9, 0), [], ("cuda", "bfloat16", True, [])),                                   # H100, H200
    ((8, 0), [], ("cuda", "bfloat16", False, ["measured only on compute capability 9.0"])),   # A100
    ((7, 5), [], ("cuda", "float16", False, ["measured only on compute capability 9.0"])),    # T4
    ((8, 6), ["--fast"], ("cuda", "bfloat16", True, [])),
    ((9, 0), ["--amp-dtype", "float32"], ("cuda", "float32", True, [])),
    ("no triton", [], ("cuda", "bfloat16", False, ["measured only"])),
    ("mps", [], ("mps", "float32", False, [])),
    ("cpu", [], ("cpu", "float32", False, [])),
    ("cpu", ["--amp-dtype", "bfloat16", "--fast"], ("cpu", "bfloat16", True, [])),
])
def test_precision_fast_path_and_device_are_chosen_by_the_hardware(monkeypatch, machine, flags, expected):
    """bfloat16 where the GPU computes it natively, float16 (with loss scaling) on older GPUs, float32
    on MPS and CPUs; the fast path where it was measured; each flag given wins over the choice."""
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "triton" and machine == "no triton" else find_spec(name))
    if machine in ("mps", "cpu"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: machine == "mps")
        monkeypatch.setattr(torch.mps, "is_available", lambda: machine == "mps", raising=False)
        monkeypatch.setattr(torch.mps, "device_count", lambda: 1, raising=False)
    else:
        as_on_a_gpu(monkeypatch, (9, 0) if machine == "no triton" else machine)
    a = train_cifar.parse_args(flags)
    device, amp_dtype, fast, notes = expected
    assert (a.device, a.amp_dtype, a.fast) == (device, amp_dtype, fast)
    assert len(a.notes) == len(notes) and all(n in line for n, line in zip(notes, a.notes))


def test_a_precision_the_machine_or_the_fast_path_cannot_run_is_one_line(monkeypatch, capsys):
    as_on_a_gpu(monkeypatch, (7, 5), bf16=False)
    for flags, words in [(["--fast"], "--amp-dtype float16 (loss scaling) is not tested with --fast"),
                         (["--amp-dtype", "bfloat16"], "cannot compute in bfloat16; use --amp-dtype float16")]:
        with pytest.raises(SystemExit):
            train_cifar.parse_args(flags)
        assert words in capsys.readouterr().err, flags
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "is_available", lambda: True, raising=False)
    monkeypatch.setattr(torch.mps, "device_count", lambda: 1, raising=False)
    for flags in (["--fast"], ["--amp-dtype", "bfloat16"]):
        with pytest.raises(SystemExit):
            train_cifar.parse_args(flags)
        assert "--device mps runs the plain path in float32" in capsys.readouterr().err, flags


def test_every_train_cifar_flag_that_the_project_mentions_exists(capsys):
    """README, notebook, docstrings and tools name train_cifar.py's flags; a renamed or removed
    flag must not live on in them."""
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--help"])
    known = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out))
    assert {"--hdim", "--resume", "--no-fast", "--amp-dtype"} <= known
    cells = json.loads((ROOT / "tutorial.ipynb").read_text())["cells"]
    texts = {"tutorial.ipynb": "\n".join("".join(c["source"]) for c in cells),
             **{name: (ROOT / name).read_text() for name in
                ("README.md", "results/README.md", "fast/README.md", "docs/model.md")}}
    for folder, pattern in [(".", "*.py"), ("fast", "*.py"), ("tools", "*")]:
        texts.update({str(f.relative_to(ROOT)): f.read_text() for f in sorted((ROOT / folder).glob(pattern))
                      if f.is_file()})
    unknown = [(name, flag, line.strip()) for name, text in texts.items() for line in text.splitlines()
               if "train_cifar.py" in line
               for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line[line.index("train_cifar.py"):])
               if flag not in known]
    assert not unknown, unknown


# ---------------------------------------------------------------------------------------------
# The recipe, element by element

def test_one_cycle_schedule():
    lr = train_cifar.one_cycle_lr
    assert lr(0, 0.01) == 0 and lr(0.4, 0.01) == pytest.approx(0.01) and lr(0.2, 0.01) == pytest.approx(0.005)
    assert lr(0.8, 0.01) == pytest.approx(0.0005) and lr(1.0, 0.01) == 0
    assert lr(0.6, 0.01) == pytest.approx((0.01 + 0.0005) / 2)


def test_learning_rate_and_clipping_reach_every_step(tmp_path, monkeypatch):
    steps, original = [], train_cifar.train_step

    def recording(model, optimizer, scaler, criterion, images, targets, lr, amp, clip):
        steps.append((lr, clip))
        return original(model, optimizer, scaler, criterion, images, targets, lr, amp, clip)
    monkeypatch.setattr(train_cifar, "train_step", recording)
    run_main(*FAKE, "--epochs", "2", "--batch-size", "50", "--fake-data", "200", "--clip", "0.5", "--lr", "0.02",
             "--out", tmp_path / "o")
    total = 8
    assert [lr for lr, _ in steps] == pytest.approx([train_cifar.one_cycle_lr((i + 1) / total, 0.02) for i in range(total)])
    assert {clip for _, clip in steps} == {0.5}


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = nn.Linear(4, 10)
    args = train_cifar.parse_args(["--device", "cpu", "--wd", "0"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, targets = torch.randn(8, 4) * 100, nn.functional.one_hot(torch.arange(8) % 10, 10).float()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    train_cifar.train_step(model, optimizer, scaler, nn.CrossEntropyLoss(), x, targets, 1.0, None, 0.1)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.1, rel=1e-4) and args.clip == 1.0


def test_weight_decay_applies_to_conv_and_linear_weights_only():
    model = ConvMixer(8, 1, 3, 4, n_classes=10)
    optimizer = train_cifar.make_optimizer(model, train_cifar.parse_args(["--device", "cpu", "--wd", "0.3"]))
    groups = {g["weight_decay"]: g["params"] for g in optimizer.param_groups}
    assert all(p.ndim > 1 for p in groups[0.3]) and all(p.ndim == 1 for p in groups[0.0])
    assert len(groups[0.3]) + len(groups[0.0]) == len(list(model.parameters())) and optimizer.defaults["eps"] == 1e-3


def test_float16_loss_scaling_skips_a_step_whose_gradients_overflow(monkeypatch):
    """PyTorch's AMP recipe in train_step: the scaled loss backward, the gradients unscaled before
    clipping, a step with an inf gradient skipped (weights and AdamW's moments untouched) and the
    scale halved, and the next step taken."""
    torch.manual_seed(0)
    model = ConvMixer(8, 1, 3, 4, n_classes=10)
    optimizer = train_cifar.make_optimizer(model, train_cifar.parse_args(["--device", "cpu"]))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    x, targets = torch.randn(8, 3, 32, 32), nn.functional.one_hot(torch.arange(8) % 10, 10).float()
    norms, clip_grad_norm = [], nn.utils.clip_grad_norm_
    monkeypatch.setattr(nn.utils, "clip_grad_norm_", lambda params, clip: norms.append(clip_grad_norm(params, clip)))

    def step():
        return train_cifar.train_step(model, optimizer, scaler, criterion, x, targets, 0.01, torch.float16, 1.0)
    step()
    assert norms[-1] < 100 and scaler.get_scale() == 2.0**10          # clipped after unscaling
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    hook = model[0].weight.register_hook(lambda grad: grad * float("inf"))        # an overflow
    step()
    hook.remove()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(optimizer.state.values(), moments))
    step()
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_loss_is_label_smoothed_cross_entropy_on_soft_targets(tmp_path, monkeypatch):
    criteria, loss = [], nn.CrossEntropyLoss
    monkeypatch.setattr(train_cifar.nn, "CrossEntropyLoss", lambda **kw: criteria.append(kw) or loss(**kw))
    run_main(*FAKE, "--epochs", "1", "--batch-size", "50", "--fake-data", "100", "--out", tmp_path / "o")
    assert criteria == [{"label_smoothing": 0.1}]
    logits, targets = torch.tensor([[2.0, -1.0, 0.5, 0, 0, 0, 0, 0, 0, 1.0]]), torch.zeros(1, 10)
    targets[0, 0], targets[0, 2] = 0.7, 0.3                                  # a mixed image
    expected = -((0.9 * targets + 0.01) * logits.log_softmax(1)).sum()
    assert loss(**criteria[0])(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cpu_transform_crops_and_flips_at_the_recipes_rates():
    """train_transform without RandAugment, on a horizontal ramp: the crop's width shows in the
    output's range, a flip in its direction; it erases nothing (that comes after mixing)."""
    transform = train_cifar.train_transform(train_cifar.parse_args(["--ra-n", "0", "--device", "cpu"]))
    ramp = (torch.arange(32) * 8).view(1, 1, 32).expand(3, 32, 32).to(torch.uint8)
    torch.manual_seed(0)
    flipped, widths = 0, []
    for _ in range(2000):
        x = transform(ramp)[0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]            # back to [0, 1]
        assert -0.1 < x.min() and x.max() < 1.1
        flipped += int(x[16, 0] > x[16, -1])
        widths.append((x[16].max() - x[16].min()).item() * 255 / 8 + 1)       # ~ the crop's width
    assert abs(flipped / 2000 - 0.5) < 0.05
    widths = torch.tensor(widths)      # scale 0.75-1, aspect 3/4-4/3: widths from 24 pixels, 29.4 on average
    assert widths.min() >= 23.5 and widths.quantile(0.1) >= 25.5 and 28.7 < widths.mean() < 30


def test_erasing_comes_after_mixing_each_image_in_its_own_box_at_the_recipes_rate():
    torch.manual_seed(0)
    images = torch.zeros(4000, 3, 32, 32)
    erased = train_cifar.erase_each(images, 0.25)
    boxes = erased.ne(0).any(1)                                            # (N, 32, 32)
    hit = boxes.flatten(1).any(1)
    assert abs(hit.float().mean() - 0.25) < 0.03
    assert len({tuple(b.nonzero()[0].tolist()) for b in boxes[hit][:100]}) > 50      # own boxes
    assert torch.equal(train_cifar.erase_each(images[:10], 0.0), images[:10])
    # In the batches the boxes are erased after mixing: what they hold is N(0, 1) noise, not noise
    # blended with another image by MixUp (nor cut into one by CutMix).
    batches = []
    for reprob in ("0", "1"):
        args = train_cifar.parse_args([*FAKE, "--fake-data", "200", "--batch-size", "50", "--reprob", reprob])
        data = train_cifar.training_data(args, *train_cifar.load_data(args, True), torch.device("cpu"))
        batches.append(torch.cat([x for x, _ in train_cifar.epoch_batches(args, data, 0, torch.device("cpu"))]))
    unerased, erased = batches
    noise = erased[erased != unerased]
    assert len(noise) > 50_000 and abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def test_batch_mixing_chooses_mixup_or_cutmix_per_batch():
    mix = train_cifar.batch_mixing(train_cifar.parse_args(["--device", "cpu"]))
    images = (torch.arange(10).float() * 10).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    kinds = [len(torch.unique(mix(images, torch.arange(10))[0][0])) for _ in range(200)]
    assert 70 < kinds.count(1) < 130 and kinds.count(1) + kinds.count(2) == 200   # 1: MixUp, 2: CutMix


@pytest.mark.parametrize("mixer", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_images_and_targets_alike(mixer):
    other = "cutmix" if mixer == "mixup" else "mixup"
    mix = train_cifar.batch_mixing(train_cifar.parse_args(["--device", "cpu", f"--{other}", "0"]))
    values = torch.arange(10).float() * 10                 # image i is filled with 10 * i
    images = values.view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    mixed, targets = mix(images, torch.arange(10))
    assert targets.shape == (10, 10) and torch.allclose(targets.sum(1), torch.ones(10))
    assert (targets.max(1).values < 0.999).all()
    torch.testing.assert_close(mixed.mean((1, 2, 3)), targets @ values, atol=1e-3, rtol=1e-4)
    assert all(len(torch.unique(m)) == (1 if mixer == "mixup" else 2) for m in mixed)
    alphas = [float(mix(images, torch.arange(10))[1].max(1).values[0]) for _ in range(200)]
    assert 0.75 < sum(alphas) / len(alphas) < 0.9          # alpha 0.5: Beta(0.5, 0.5)'s larger share


def record_training_batches(monkeypatch, tmp_path, argv):
    """Train on 64 copies of one image (so that any two augmented images differ only by their random
    draws) and return what each step was given: [(images, targets)] in order."""
    image = sample_images(1)[0]
    real = train_cifar.load_data
    monkeypatch.setattr(train_cifar, "load_data", lambda args, train: (
        (image.expand(64, 3, 32, 32).clone(), torch.arange(64) % 10) if train else real(args, train)))
    steps = []

    def record(model, optimizer, scaler, criterion, images, targets, *rest):
        steps.append((images.clone(), targets.clone()))
        return torch.tensor(2.3), torch.tensor(0)
    monkeypatch.setattr(train_cifar, "train_step", record)
    run_main(*FAKE, "--fake-data", "64", "--batch-size", "16", "--epochs", "2", "--out", tmp_path, *argv)
    return steps


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_every_random_choice_changes_where_the_recipe_says_and_repeats_with_the_seed(path, tmp_path, monkeypatch):
    """Per image (crop, flip, ops, magnitudes, erasing), per step (MixUp or CutMix, its lambda), per
    epoch (the order and the images' draws) and, with --fast, per chunk of steps: each choice is drawn
    anew where the recipe draws it, and the same for the same seed, with any --workers."""
    import fast.augment
    monkeypatch.setattr(fast.augment, "AUGMENT_CHUNK_IMAGES", 32)        # 2 chunks of 2 steps an epoch
    flags = ["--fast" if path == "fast" else "--no-fast"]
    runs = {name: record_training_batches(monkeypatch, tmp_path / name.replace(" ", "_"), [*flags, *argv])
            for name, argv in {"unmixed": ["--mixup", "0", "--cutmix", "0"], "mixed": [],
                               "mixed again": ["--workers", "2" if path == "plain" else "0"],
                               "other seed": ["--seed", "1"]}.items()}
    # Per epoch and seed, the order: the labels (image i has label i % 10) tell the images apart.
    order = [t.argmax(1) for _, t in runs["unmixed"]]
    epoch_1, epoch_2 = torch.cat(order[:4]), torch.cat(order[4:])
    assert not torch.equal(epoch_1, epoch_2) and not torch.equal(epoch_1, torch.arange(64) % 10)
    images = torch.cat([x for x, _ in runs["unmixed"]])                    # (8 steps * 16, 3, 32, 32)
    assert len(images) == 128 and len(torch.unique(images.flatten(1), dim=0)) == 128
    lambdas = []
    for _, targets in runs["mixed"]:                       # one draw per batch, a new one every step
        shares = targets.max(1).values[targets.max(1).values < 1]
        assert len(shares) > 8 and torch.allclose(shares, shares[0])
        lambdas.append(round(shares[0].item(), 6))
    assert len(set(lambdas)) == len(lambdas) == 8, lambdas
    for (x, t), (x_again, t_again) in zip(runs["mixed"], runs["mixed again"]):
        assert torch.equal(x, x_again) and torch.equal(t, t_again)
    assert not any(torch.equal(x, x_other) for (x, _), (x_other, _) in zip(runs["mixed"], runs["other seed"]))


# ---------------------------------------------------------------------------------------------
# Evaluation

def linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.BatchNorm1d(10))


def normalized(images):
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluation_runs_in_eval_mode_and_leaves_the_model_in_the_callers_mode(mode):
    model = linear_model()
    model[2].running_mean.uniform_(-3, 3)                  # statistics far from any batch's
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        labels = model.eval()(normalized(images)).argmax(1)
    model.train(mode == "train")
    statistics = model[2].running_mean.clone()
    assert train_cifar.evaluate(model, images, labels, torch.device("cpu"), None) == [100.0]
    assert model.training == (mode == "train") and torch.equal(model[2].running_mean, statistics)


def test_evaluation_on_a_cpu_takes_batches_of_20_and_every_image_once_in_order():
    seen, model = [], linear_model()[:2]
    model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    images = torch.randint(0, 256, (250, 3, 32, 32), dtype=torch.uint8)
    logits = train_cifar.predict(model, images, torch.device("cpu"), None)
    assert seen == [20] * 12 + [10] and logits.shape == (250, 10) and logits.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(logits, model(normalized(images)))


def test_flip_tta_adds_the_logits_of_the_horizontal_mirror():
    model = linear_model()[:2]
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    x = normalized(images)
    with torch.no_grad():
        plain, mirrored, upside_down = model(x), model(x.flip(3)), model(x.flip(2))
    labels = (plain + mirrored).argmax(1)
    labels[:100] = (plain + upside_down).argmax(1)[:100]     # half of them: what a vertical flip says
    accuracy, flip_tta = train_cifar.evaluate(model, images, labels, torch.device("cpu"), None, flip_tta=True)
    assert flip_tta == pytest.approx(100.0 * ((plain + mirrored).argmax(1) == labels).float().mean().item())
    assert flip_tta < 100 and accuracy == pytest.approx(100.0 * (plain.argmax(1) == labels).float().mean().item())


def test_missing_data_without_network_says_where_the_files_go(tmp_path, monkeypatch):
    import torchvision
    # A local port that refuses connections stands in for "no network".
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(train_cifar.Fail, match="cifar-10-batches-py") as e:
        train_cifar.load_data(train_cifar.parse_args(["--device", "cpu", "--data", str(tmp_path / "empty")]), True)
    assert str(tmp_path / "empty") in str(e.value)


# ---------------------------------------------------------------------------------------------
# Whole runs (slow)

@pytest.mark.slow
def test_a_run_writes_its_log_and_model(reference_run):
    out, final = reference_run
    log = read_log(out)
    assert log[0]["config"]["hdim"] == 32 and {"device", "commit", "torch", "n_params"} <= set(log[0])
    epochs = [r for r in log if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and ["test_acc" in r for r in epochs] == [False, True, True]
    assert log[-1] == final and final["final"] and {"test_acc", "test_acc_flip_tta"} <= set(final)
    assert final["test_acc"] == epochs[-1]["test_acc"]                 # the last epoch's, not the best
    assert epochs[-1]["lr"] == 0.0 and max(r["lr"] for r in epochs) <= 0.01
    saved = torch.load(out / "model.pt", weights_only=True)
    assert storage_locations(out / "model.pt") == {"cpu"}
    model = train_cifar.build_model(saved["config"])
    model.load_state_dict(saved["state_dict"], strict=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["records"] == log and not list(out.glob("*.tmp"))
    assert all(torch.equal(last["model"][k], v) for k, v in saved["state_dict"].items())


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None, reason="needs the real CIFAR-10 (set CIFAR10_ROOT)")
def test_a_tiny_model_learns_real_cifar10(reference_run):
    assert reference_run[1]["test_acc"] > 25.0         # chance is 10%


@pytest.mark.slow
def test_eval_reproduces_the_logged_accuracy(reference_run, capsys):
    out, final = reference_run
    run_main("--eval", out / "model.pt", "--device", "cpu", *DATA)
    printed = capsys.readouterr().out
    assert printed.startswith(f"evaluating {out / 'model.pt'}: ")
    assert f"test accuracy {final['test_acc']:.2f}% (flip-TTA {final['test_acc_flip_tta']:.2f}%)" in printed


@pytest.mark.slow
def test_val_holds_out_the_last_training_images_and_reports_them(tmp_path, monkeypatch):
    trained, held_out, epoch_batches, accuracies = [], [], train_cifar.epoch_batches, train_cifar.accuracies
    monkeypatch.setattr(train_cifar, "epoch_batches", lambda args, data, *a: trained.append(data.images) or
                        epoch_batches(args, data, *a))
    monkeypatch.setattr(train_cifar, "accuracies", lambda model, test, val, *a, **k: held_out.append(val) or
                        accuracies(model, test, val, *a, **k))
    run_main(*FAKE, "--epochs", "2", "--batch-size", "100", "--fake-data", "1000", "--val", "300",
             "--eval-every", "1", "--out", tmp_path / "o")
    log = read_log(tmp_path / "o")
    images, labels = train_cifar.load_data(train_cifar.parse_args([*FAKE, "--fake-data", "1000"]), True)
    assert log[0]["config"]["n_train"] == 700 and torch.equal(trained[0], images[:700])
    assert torch.equal(held_out[0][0], images[700:]) and torch.equal(held_out[0][1], labels[700:])
    assert all("val_acc" in r for r in log[1:]) and log[-1]["final"]


@pytest.mark.slow
def test_existing_out_and_bad_files_fail_in_one_line_naming_them(reference_run, tmp_path, capsys):
    out, _ = reference_run
    garbage, mismatched, a_file = tmp_path / "garbage.pt", tmp_path / "mismatched.pt", tmp_path / "a_file"
    garbage.write_text("not a checkpoint")
    a_file.write_text("")
    saved = torch.load(out / "model.pt", weights_only=True)
    torch.save({**saved, "config": {**saved["config"], "hdim": 48}}, mismatched)
    cases = [(["--out", out, *DATA], f"--out {out} holds a run already"),
             (["--resume", "--out", out], "has finished all its epochs"),
             (["--resume", "--out", tmp_path / "none"], "there is no"),
             (["--eval", tmp_path / "missing.pt"], "missing.pt"),
             (["--eval", garbage], "garbage.pt: cannot read it as a checkpoint"),
             (["--eval", mismatched, "--fake-data", "10"], "mismatched.pt: not a CIFAR-10 ConvMixer"),
             (["--out", a_file, "--fake-data", "200"], "is a file"),
             (["--data", a_file, "--epochs", "1", "--out", tmp_path / "d"], f"--data {a_file} is a file"),
             ([*FAKE, "--fake-data", "200", "--batch-size", "50", "--out", a_file / "run"], "cannot write there")]
    if REAL_DATA:                                        # a truncated batch file
        corrupt = tmp_path / "corrupt" / "cifar-10-batches-py"
        shutil.copytree(f"{REAL_DATA}/cifar-10-batches-py", corrupt)
        (corrupt / "data_batch_3").write_bytes((corrupt / "data_batch_3").read_bytes()[:1000])
        cases.append((["--data", corrupt.parent, "--epochs", "1", "--out", tmp_path / "c"], "data_batch_3 fails"))
    for argv, expected in cases:
        error = error_lines_of_main([*argv, "--device", "cpu"], capsys)
        assert len(error) == 1 and error[0].startswith("train_cifar.py: error: ") and expected in error[0], (argv, error)
    assert not any((tmp_path / name).exists() for name in ("none", "c", "d"))
    result = run_script("--eval", garbage, check=False)             # and one as a user sees it
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_a_non_finite_loss_stops_in_one_line_and_keeps_the_last_epochs_checkpoint(tmp_path, capsys, monkeypatch):
    epoch_batches = train_cifar.epoch_batches

    def poisoned(args, data, epoch, device):              # the second epoch's third batch
        for i, (x, t) in enumerate(epoch_batches(args, data, epoch, device)):
            yield (x * float("nan") if (epoch, i) == (1, 2) else x), t
    monkeypatch.setattr(train_cifar, "epoch_batches", poisoned)
    error = error_lines_of_main([*FAKE, "--epochs", "3", "--batch-size", "50", "--fake-data", "200",
                                 "--out", tmp_path / "o"], capsys)
    assert error == [f"train_cifar.py: error: the loss became nan or inf in epoch 2; {tmp_path / 'o'}/last.pt "
                     f"holds epoch 1"]
    assert torch.load(tmp_path / "o" / "last.pt", weights_only=True)["epoch"] == 1
