"""How strongly train_cifar.py's RandAugment changes CIFAR-10 images, next to timm's, the paper's.

    pip install timm                       # for this comparison only; not a project dependency
    python tools/compare_randaugment.py    # --n 5000 --data ./data --seed 0

The paper's CIFAR-10 runs used timm's RandAugment "rand-m9-mstd0.5-inc1" (the settings quoted in
the official repository's issue tracker). train_cifar.py builds it from torchvision's RandAugment
instead (train_cifar.randaugment), and torchvision's defaults differ: a 0-30 magnitude scale
where timm's is 0-10, and every drawn op applied where timm applies each with probability 0.5.
This prints, for the first --n training images, how many come out of the RandAugment stage
unchanged and the mean absolute pixel change per image (0-255 scale), for timm's transform, for
train_cifar.py's, and for torchvision's RandAugment(num_ops=2, magnitude=9) with its defaults;
then the mean change of each op on its own (applied to every image, random sign), timm's next to
train_cifar.py's, which shows where the two still differ.
"""
import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_cifar  # noqa: E402


def timm_auto_augment():
    try:
        from timm.data import auto_augment
    except ImportError:
        sys.exit("compare_randaugment.py: needs timm (pip install timm)")
    posterize = auto_augment.posterize

    def posterize_0_bits_is_black(img, bits, **kwargs):
        # timm keeps 4 - int(4 * m / 10) bits: 0 when the noisy magnitude reaches 10. Current
        # Pillow (13) refuses 0 bits; older Pillow's bit mask made the image black, as here.
        return Image.new(img.mode, img.size) if bits <= 0 else posterize(img, bits, **kwargs)

    for name in ("PosterizeIncreasing", "Posterize", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = posterize_0_bits_is_black
    return auto_augment


# As timm's transforms_factory sets RandAugment up for 32 x 32 training images with CIFAR-10's mean.
TIMM_HPARAMS = dict(translate_const=int(32 * 0.45), img_mean=tuple(train_cifar.CIFAR10_MEAN_PIXEL))


def on_tensor(pil_transform):
    """A PIL transform as one of uint8 (3, H, W) tensors."""
    return lambda image: torch.from_numpy(
        np.array(pil_transform(Image.fromarray(image.permute(1, 2, 0).numpy())))).permute(2, 0, 1)


def mean_change(transform, images, seed):
    """Per image, the mean absolute change of its pixels (0-255), (n,)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out = torch.stack([transform(image) for image in images])
    return (out.float() - images.float()).abs().mean((1, 2, 3))


def each_op(images, seed):
    """Mean change of every op of either RandAugment, applied alone to every image."""
    auto_augment = timm_auto_augment()
    timm_ops = {name: on_tensor(auto_augment.AugmentOp(name, prob=1.0, magnitude=9,
                                                       hparams=TIMM_HPARAMS | {"magnitude_std": 0.5}))
                for name in auto_augment._RAND_INCREASING_TRANSFORMS}
    ours = train_cifar.randaugment_op(train_cifar.parse_args(["--device", "cpu"]))

    def our_op(name):
        magnitudes, signed = ours._AUGMENTATION_SPACE[name]
        m = magnitudes(ours.num_magnitude_bins, 32, 32)
        m = 0.0 if m is None else float(m[ours.magnitude])
        return lambda image: ours._apply_image_or_video_transform(
            image, name, -m if signed and torch.rand(()) < 0.5 else m,
            interpolation=ours.interpolation, fill=ours._fill)

    # timm's "inc1" names and torchvision's for the same op
    same = {"ColorIncreasing": "Color", "ContrastIncreasing": "Contrast",
            "BrightnessIncreasing": "Brightness", "SharpnessIncreasing": "Sharpness",
            "PosterizeIncreasing": "Posterize", "SolarizeIncreasing": "Solarize",
            "TranslateXRel": "TranslateX", "TranslateYRel": "TranslateY"}
    rows = {same.get(name, name): [mean_change(op, images, seed).mean().item(), None]
            for name, op in timm_ops.items()}
    for name in ours._AUGMENTATION_SPACE:
        rows.setdefault(name, [None, None])[1] = mean_change(our_op(name), images, seed).mean().item()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="how many training images")
    p.add_argument("--data", default="./data", help="CIFAR-10 root (downloaded if missing)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    images, _ = train_cifar.load_cifar10(args.data, train=True)
    images = images[:args.n]
    paper = timm_auto_augment().rand_augment_transform("rand-m9-mstd0.5-inc1", TIMM_HPARAMS)
    transforms = {
        'timm "rand-m9-mstd0.5-inc1" (the paper)': on_tensor(paper),
        "train_cifar.py (defaults)": train_cifar.randaugment(train_cifar.parse_args(["--device", "cpu"])),
        "torchvision RandAugment(num_ops=2, magnitude=9)": v2.RandAugment(num_ops=2, magnitude=9),
    }
    print(f"RandAugment stage alone on the first {len(images):,} CIFAR-10 training images "
          f"(torch {torch.__version__}, torchvision {torchvision.__version__})")
    print(f"{'':48s} {'unchanged':>9s}  mean |change|  median   90th pct")
    for name, transform in transforms.items():
        change = mean_change(transform, images, args.seed)
        print(f"{name:48s} {100 * (change == 0).float().mean():8.1f}%  {change.mean():12.2f}  "
              f"{change.median():6.2f}  {change.quantile(0.9):9.2f}")
    print("\nmean |change| of each op alone, at magnitude 9   timm   train_cifar.py")
    for name, (theirs, ours) in each_op(images, args.seed).items():
        print(f"    {name:44s} " + "  ".join(f"{v:6.2f}" if v is not None else "     -" for v in (theirs, ours)))


if __name__ == "__main__":
    main()
