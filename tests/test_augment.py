"""RandAugment (randaugment.py) against timm's, and fast/augment.py's batch augmentation
against the readable per-image path of train_cifar.py (train_transform).
"""
import pytest
import torch

from helpers import (CIFAR10_MEAN, CIFAR10_STD, sample_images)


def batch_augment(**kwargs):
    import train_cifar
    from fast.augment import BatchAugment
    return BatchAugment(train_cifar.RANDAUGMENT_OPS, CIFAR10_MEAN, CIFAR10_STD, **kwargs)


# timm's "inc1" op list and each op's argument at magnitudes 9 and 10 (timm/data/auto_augment.py).
TIMM_AT_9_AND_10 = {
    "AutoContrast": None, "Equalize": None, "Invert": None, "Rotate": (27, 30),
    "PosterizeIncreasing": (1, 0), "SolarizeIncreasing": (26, 0), "SolarizeAdd": (99, 110),
    "ColorIncreasing": (0.81, 0.9), "ContrastIncreasing": (0.81, 0.9), "BrightnessIncreasing": (0.81, 0.9),
    "SharpnessIncreasing": (0.81, 0.9), "ShearX": (0.27, 0.3), "ShearY": (0.27, 0.3),
    "TranslateXRel": (0.405, 0.45), "TranslateYRel": (0.405, 0.45),
}


def test_randaugment_ops_are_timms():
    import train_cifar
    ops = train_cifar.RANDAUGMENT_OPS
    assert [op.name for op in ops] == list(TIMM_AT_9_AND_10)
    for op in ops:
        expected = TIMM_AT_9_AND_10[op.name]
        assert (op.argument is None) == (expected is None), op.name
        if expected:
            for m, value in zip((9.0, 10.0), expected):
                assert float(op.argument(torch.tensor(m))) == pytest.approx(value), (op.name, m)
        assert op.signed == (op.name in {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
                             or op.name.startswith(("Color", "Contrast", "Brightness", "Sharpness")))
    by_name = {op.name: op for op in ops}
    image = sample_images(1)[0]
    gray = torch.tensor([100, 127, 128, 200], dtype=torch.uint8).view(1, 1, 4).expand(3, 4, 4)
    assert by_name["SolarizeAdd"].apply(gray, 99)[0, 0].tolist() == [199, 226, 128, 200]
    assert by_name["SolarizeIncreasing"].apply(gray, 128)[0, 0].tolist() == [100, 127, 127, 55]
    assert by_name["PosterizeIncreasing"].apply(image, 0).eq(0).all()          # 0 bits: black
    assert by_name["PosterizeIncreasing"].apply(gray, 1)[0, 0].tolist() == [0, 0, 128, 128]
    assert torch.equal(by_name["Invert"].apply(image, None), 255 - image)
    # Enhance factors never go below 0.1 (timm): -0.95 acts as 0.1, not as 0.05.
    brightness = by_name["BrightnessIncreasing"].apply
    assert torch.equal(brightness(gray, -0.95), brightness(gray, -0.9))
    assert not torch.equal(brightness(gray, -0.9), brightness(gray, -0.85))
    # A translation by 0.25 of the side moves the image by 8 pixels and fills with the mean colour.
    moved = by_name["TranslateXRel"].apply(image, 0.25)
    assert torch.equal(moved[:, :, 8:], image[:, :, :-8])
    assert moved[:, :, :8].float().mean((1, 2)).round().tolist() == [float(round(255 * m)) for m in train_cifar.MEAN]


def recorded_randaugment(monkeypatch, n, **kwargs):
    """Run the CPU RandAugment stage n times, recording (op name, argument) of each applied op."""
    import train_cifar
    calls = []
    recording = [op._replace(apply=lambda x, a, name=op.name: calls.append((name, a)) or x)
                 for op in train_cifar.RANDAUGMENT_OPS]
    monkeypatch.setattr(train_cifar, "RANDAUGMENT_OPS", recording)
    a = train_cifar.parse_args(["--device", "cpu", *kwargs.get("argv", [])])
    stage = train_cifar.RandAugment(train_cifar.RANDAUGMENT_OPS, a.ra_n, a.ra_m, a.ra_mstd, a.ra_p)
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    for _ in range(n):
        stage(image)
    return calls


def test_randaugment_draws_as_timm_does(monkeypatch):
    """2 ops drawn uniformly from 15, each applied with p 0.5, magnitude N(9, 0.5) clipped to
    [0, 10], a random sign for signed ops."""
    n = 20_000
    calls = recorded_randaugment(monkeypatch, n)
    assert abs(len(calls) / (2 * n) - 0.5) < 0.015                   # p = 0.5, 2 ops an image
    names = [name for name, _ in calls]
    for name in TIMM_AT_9_AND_10:
        assert abs(names.count(name) / len(calls) - 1 / 15) < 0.01, name
    rotations = torch.tensor([float(a) for name, a in calls if name == "Rotate"])
    assert abs((rotations < 0).float().mean() - 0.5) < 0.05
    magnitude = rotations.abs() / 3                                   # 30 * m / 10
    assert abs(magnitude.mean() - 9) < 0.05 and abs(magnitude.std() - 0.5) < 0.05
    assert magnitude.max() <= 10
    bits = torch.tensor([float(a) for name, a in calls if name == "PosterizeIncreasing"])
    assert set(bits.tolist()) <= {0.0, 1.0, 2.0} and (bits == 1).float().mean() > 0.9


def test_batched_ops_match_the_cpu_ops_image_by_image():
    """Each op of fast/augment.py, with every image's own argument, gives what the CPU op gives."""
    import train_cifar
    from fast.augment import BATCHED_OPS
    images = sample_images(64)
    g = torch.Generator().manual_seed(0)
    fill = [float(round(255 * m)) for m in train_cifar.MEAN]
    for op in train_cifar.RANDAUGMENT_OPS:
        m = torch.rand(len(images), generator=g) * 10
        a = None
        if op.argument:
            a = op.argument(m)
            a = torch.where(torch.rand(len(images), generator=g) < 0.5, -a, a) if op.signed else a
        ours = BATCHED_OPS[op.name](images, a, fill)
        theirs = torch.stack([op.apply(x, None if a is None else a[i]) for i, x in enumerate(images)])
        diff = (ours.int() - theirs.int()).abs()
        # float rounding in a grey conversion may differ by one level, on a few pixels
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, op.name


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_per_image_resized_crop_matches_torchvision(mode):
    from torchvision.transforms.v2 import functional as F
    from fast import augment
    images = sample_images(128)
    g = torch.Generator().manual_seed(0)
    top, left, h, w = augment.sample_crops(128, (32, 32), (0.5, 1.0), g, "cpu")
    bicubic = torch.full((128,), mode == "bicubic")
    ours = augment.resized_crop(images, top, left, h, w, bicubic, (32, 32)).int()
    interpolation = F.InterpolationMode.BICUBIC if mode == "bicubic" else F.InterpolationMode.BILINEAR

    def crop(image, t, l, hh, ww):
        return F.resized_crop(image, int(t), int(l), int(hh), int(ww), [32, 32],
                              interpolation=interpolation, antialias=True)
    exact = torch.stack([crop(im.float(), *box) for im, *box in zip(images, top, left, h, w)])
    diff = (ours - exact.round().clamp(0, 255).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    # torchvision's CPU kernels for uint8 images compute in fixed point: close, not equal.
    tv = torch.stack([crop(im, *box) for im, *box in zip(images, top, left, h, w)]).int()
    assert (ours - tv).abs().float().mean() < 0.3
    assert mode == "bicubic" or (ours - tv).abs().max() <= 1


def test_batch_augment_equals_the_cpu_ops_for_the_drawn_parameters():
    """Whole pipeline, image by image: crop box and interpolation, flip, the RandAugment ops with
    their magnitudes and signs, normalization and the erased box, each applied with torchvision."""
    from torchvision.transforms.v2 import functional as F
    import train_cifar
    images = sample_images(48)
    augment = batch_augment()
    params = augment.sample(len(images), torch.Generator().manual_seed(1), "cpu")
    ours = augment.erase(augment(images, torch.Generator().manual_seed(2), params), params=params)
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    for i, image in enumerate(images):
        p = {k: v[i] for k, v in params.items()}
        mode = F.InterpolationMode.BICUBIC if p["bicubic"] else F.InterpolationMode.BILINEAR
        x = F.resized_crop(image.float(), int(p["top"]), int(p["left"]), int(p["h"]), int(p["w"]),
                           [32, 32], interpolation=mode, antialias=True).round().clamp(0, 255).to(torch.uint8)
        x = F.horizontal_flip(x) if p["flip"] else x
        for k in range(2):
            if p[f"apply{k}"]:
                op = train_cifar.RANDAUGMENT_OPS[int(p[f"op{k}"])]
                a = op.argument(p[f"magnitude{k}"]) if op.argument else None
                x = op.apply(x, -a if op.signed and p[f"negative{k}"] else a)
        expected = (x.float() / 255 - mean) / std
        box = torch.zeros(32, 32, dtype=torch.bool)
        if p["erase"]:
            t, l = int(p["erase_top"]), int(p["erase_left"])
            box[t:t + int(p["erase_h"]), l:l + int(p["erase_w"])] = True
        if box.any():                                                   # noise, not the image
            assert (ours[i][:, box] - expected[:, box]).abs().max() > 0.1
        diff = (ours[i][:, ~box] - expected[:, ~box]).abs() * 255 * std.min()
        assert diff.max() < 1.01 and diff.mean() < 0.05, i               # one grey level at most


def test_batch_augment_draws_each_images_own_parameters():
    one = sample_images(1).expand(64, -1, -1, -1).contiguous()
    out = batch_augment()(one, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    distinct = {tuple(o.flatten()[::97].tolist()) for o in out}
    assert len(distinct) > 60


def test_batch_augment_issues_as_many_operations_for_a_chunk_as_for_a_batch():
    """A call's cost in launches does not grow with the number of images (fast/README.md: the count)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOperations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    augment = batch_augment()
    counts = []
    for n in (512, 4096):
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        with CountOperations() as counter:
            augment(images, torch.Generator().manual_seed(0))
        counts.append(counter.count)
    print(f"operations per call: {counts}")
    assert counts[0] == counts[1] and counts[0] > 100, counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CUDA run with the CPU run")
def test_batch_augment_on_cuda_matches_the_cpu_for_the_same_parameters():
    images = sample_images(512)
    augment = batch_augment(reprob=0.0)                    # no noise boxes
    params = augment.sample(len(images), torch.Generator().manual_seed(0), "cpu")
    cpu = augment(images, None, params)
    cuda = augment(images.cuda(), None, {k: v.cuda() for k, v in params.items()}).cpu()
    step = 1 / 255 / min(CIFAR10_STD)                      # one grey level, normalized
    diff = (cpu - cuda).abs()
    assert (diff <= 1.01 * step).float().mean() > 0.999 and diff.mean() < 0.05 * step


def test_batch_augment_samples_the_same_distribution_as_the_cpu_path(monkeypatch):
    """Crop sizes and interpolation, flips, RandAugment op frequencies, rates, magnitudes and
    signs, erasing rate and box areas."""
    from torchvision.transforms import v2
    n = 20_000
    g = torch.Generator().manual_seed(0)
    p = batch_augment().sample(n, g, "cpu")

    def close(ours, theirs, sd, name):             # sd: standard deviation of one draw
        assert abs(ours - theirs) < 5 * sd * (2 / n) ** 0.5, (name, ours, theirs)

    # RandomResizedCrop: fraction of the image kept and aspect ratio
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(32, scale=(0.75, 1.0))
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    tv = [crop.make_params([image]) for _ in range(n)]
    tv_area = torch.tensor([c["height"] * c["width"] / 1024 for c in tv])
    tv_ratio = torch.tensor([c["width"] / c["height"] for c in tv])
    area, ratio = (p["h"] * p["w"]).float() / 1024, p["w"].float() / p["h"].float()
    for ours, theirs, name in [(area, tv_area, "crop area"), (ratio, tv_ratio, "crop ratio")]:
        close(ours.mean().item(), theirs.mean().item(), theirs.std().item(), name + " mean")
        close(ours.std().item(), theirs.std().item(), theirs.std().item(), name + " std")
    assert ((p["top"] + p["h"]) <= 32).all() and ((p["left"] + p["w"]) <= 32).all()
    close(p["top"].float().mean().item(), torch.tensor([c["top"] for c in tv]).float().mean().item(),
          1.0, "crop top")
    close(p["flip"].float().mean().item(), 0.5, 0.5, "flip rate")
    close(p["bicubic"].float().mean().item(), 0.5, 0.5, "bicubic rate")

    # RandAugment, against the CPU stage's own draws
    calls = recorded_randaugment(monkeypatch, n // 2)
    applied = torch.cat([p["apply0"], p["apply1"]])
    close(applied.float().mean().item(), len(calls) / n, 0.5, "rate of applied ops")
    ops = torch.cat([p["op0"], p["op1"]])[applied]
    for index, name in enumerate(TIMM_AT_9_AND_10):
        close((ops == index).float().mean().item(), sum(c[0] == name for c in calls) / len(calls),
              (1 / 15) ** 0.5, f"frequency of {name}")
    magnitude = torch.cat([p["magnitude0"], p["magnitude1"]])
    cpu_magnitude = torch.tensor([abs(float(a)) / 3 for name, a in calls if name == "Rotate"])
    close(magnitude.mean().item(), cpu_magnitude.mean().item(), 0.5 * 15 ** 0.5, "magnitude mean")
    close(magnitude.std().item(), cpu_magnitude.std().item(), 0.5 * 15 ** 0.5, "magnitude std")
    negative = torch.cat([p["negative0"], p["negative1"]])
    cpu_negative = [float(a) < 0 for name, a in calls if name == "Rotate"]
    close(negative.float().mean().item(), sum(cpu_negative) / len(cpu_negative), 0.5 * 15 ** 0.5,
          "negative sign rate")

    # RandomErasing(p=0.25, value="random"): how often, and how much of the image
    erase = v2.RandomErasing(p=0.25, value="random")
    blank = torch.zeros(3, 32, 32)
    tv_areas = torch.tensor([(erase(blank)[0] != 0).float().mean().item() for _ in range(n)])
    ours_areas = torch.where(p["erase"], (p["erase_h"] * p["erase_w"]).float() / 1024, 0.0)
    close((ours_areas > 0).float().mean().item(), (tv_areas > 0).float().mean().item(), 0.5, "erase rate")
    close(ours_areas.mean().item(), tv_areas.mean().item(), tv_areas.std().item(), "erased area")


@pytest.mark.slow
def test_batch_augment_output_statistics_match_the_cpu_path():
    import train_cifar
    images = sample_images(3000)
    torch.manual_seed(0)
    recipe = train_cifar.parse_args(["--device", "cpu"])
    cpu = train_cifar.erase_each(torch.stack([train_cifar.train_transform(recipe)(im) for im in images]), 0.25)
    augment = batch_augment()
    gpu = augment.erase(augment(images, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    for c in range(3):
        assert abs(cpu[:, c].mean() - gpu[:, c].mean()) < 0.05, c
        assert abs(cpu[:, c].std() - gpu[:, c].std()) < 0.05, c
    erased_cpu = (cpu.abs() > 3.5).float().mean()                     # noise beyond any pixel value
    erased_gpu = (gpu.abs() > 3.5).float().mean()
    assert abs(erased_cpu - erased_gpu) < 0.3 * erased_cpu
