"""How strongly train_cifar.py's RandAugment changes CIFAR-10 images, next to timm's, the paper's.

    pip install timm                       # for this comparison only; not a project dependency
    python tools/compare_randaugment.py    # --n 3000 --data ./data --seeds 0 1 2 --skip-ops

The paper's CIFAR-10 runs used timm's RandAugment "rand-m9-mstd0.5-inc1" (the settings quoted in
the official repository's issue tracker); train_cifar.py writes the same ops with torchvision
(randaugment.py, used as train_cifar.RANDAUGMENT_OPS). This prints, for the first --n
training images, how many come out of the RandAugment stage unchanged and the mean absolute pixel
change per image (0-255 scale), for timm's transform, for train_cifar.py's, and for torchvision's
RandAugment(num_ops=2, magnitude=9) with its defaults; then the mean change of each op on its own (applied to every image, magnitude
N(9, 0.5), random sign), timm's next to train_cifar.py's.
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
TIMM_HPARAMS = dict(translate_const=int(32 * 0.45),
                    img_mean=tuple(int(v) for v in train_cifar.CIFAR10_MEAN_PIXEL))


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
    """Mean change of every op, applied alone to every image: (timm, train_cifar.py) by name."""
    auto_augment = timm_auto_augment()
    rows = {}
    for op in train_cifar.RANDAUGMENT_OPS:
        theirs = on_tensor(auto_augment.AugmentOp(op.name, prob=1.0, magnitude=9,
                                                  hparams=TIMM_HPARAMS | {"magnitude_std": 0.5}))
        ours = train_cifar.RandAugment([op], num_ops=1, magnitude=9, magnitude_std=0.5, p=1.0)
        rows[op.name] = [mean_change(theirs, images, seed).mean().item(),
                         mean_change(ours, images, seed).mean().item()]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="how many training images")
    p.add_argument("--data", default="./data", help="CIFAR-10 root (downloaded if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one table row per transform and seed, then the mean over the seeds")
    p.add_argument("--skip-ops", action="store_true", help="leave out the table of single ops")
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
    print(f"{'':48s} {'seed':>4s} {'unchanged':>9s}  mean |change|  median   90th pct")
    for name, transform in transforms.items():
        rows = []
        for seed in args.seeds:
            change = mean_change(transform, images, seed)
            rows.append([100 * (change == 0).float().mean(), change.mean(), change.median(),
                         change.quantile(0.9)])
            print(f"{name:48s} {seed:4d} " + row(rows[-1]))
        if len(args.seeds) > 1:
            print(f"{name:48s} {'mean':>4s} " + row(torch.tensor(rows).mean(0)))
    if not args.skip_ops:
        print("\nmean |change| of each op alone, at magnitude 9   timm   train_cifar.py")
        for name, (theirs, ours) in each_op(images, args.seeds[0]).items():
            print(f"    {name:44s} {theirs:6.2f}  {ours:6.2f}")


def row(values):
    unchanged, mean, median, p90 = (float(v) for v in values)
    return f"{unchanged:8.1f}%  {mean:12.2f}  {median:6.2f}  {p90:9.2f}"


if __name__ == "__main__":
    main()
