"""RandAugment as timm's "rand-m9-mstd0.5-inc1", the setting of the paper's CIFAR-10 runs, written
with torchvision.transforms.v2.functional from timm's auto_augment.py (_RAND_INCREASING_TRANSFORMS
and its magnitude rules), read as a specification. train_cifar.py builds its per-image stage from
this table; fast/augment.py has a batched twin of each op, and the tests compare the two.
"""
import math
from typing import Callable, NamedTuple, Optional

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class RandAugmentOp(NamedTuple):
    name: str
    signed: bool                           # the argument gets a random sign
    argument: Optional[Callable]           # magnitude m (a float tensor, 0-10) -> the op's argument
    apply: Callable                        # (uint8 image, argument) -> uint8 image


def shear(factor, axis):                   # timm shears by a factor, torchvision by an angle
    degrees = math.degrees(math.atan(float(factor)))
    return [degrees, 0.0] if axis == "x" else [0.0, degrees]


def enhance_factor(a):                     # timm: 1 + signed argument, never below 0.1
    return max(0.1, 1.0 + float(a))


def solarize_add(x, add):                  # add to the pixels under 128, capped at 255
    return torch.where(x < 128, (x.int() + int(add)).clamp(max=255), x).to(torch.uint8)


def randaugment_ops(fill):
    """timm's 15 ops, each with its argument as a function of the magnitude m (the comments give
    m = 9). Rotate, shear and translate fill what they uncover with `fill` (0-255 per channel; timm
    uses the data set's mean colour) and resample bilinearly (timm draws bilinear or bicubic per
    call; torchvision's tensor affine has no bicubic)."""
    def affine(x, angle=0.0, translate=(0.0, 0.0), shear=(0.0, 0.0), center=None):
        return F.affine(x, angle=float(angle), translate=[float(t) for t in translate], scale=1.0,
                        shear=[float(s) for s in shear], center=center,
                        interpolation=v2.InterpolationMode.BILINEAR, fill=list(fill))

    Op = RandAugmentOp
    return [
        Op("AutoContrast", False, None, lambda x, a: F.autocontrast(x)),
        Op("Equalize", False, None, lambda x, a: F.equalize(x)),
        Op("Invert", False, None, lambda x, a: F.invert(x)),
        Op("Rotate", True, lambda m: 30 * m / 10, lambda x, a: affine(x, angle=a)),      # +-27 degrees
        Op("PosterizeIncreasing", False, lambda m: 4 - torch.floor(4 * m / 10),         # keep 1 bit
           lambda x, a: F.posterize(x, bits=int(a))),                                    # (m 10: 0)
        Op("SolarizeIncreasing", False, lambda m: 256 - torch.floor(256 * m / 10),      # invert >= 26
           lambda x, a: F.solarize(x, threshold=float(a))),
        Op("SolarizeAdd", False, lambda m: torch.floor(110 * m / 10), solarize_add),    # +99 below 128
        Op("ColorIncreasing", True, lambda m: 9 * m / 100,                              # 1 +- 0.81
           lambda x, a: F.adjust_saturation(x, enhance_factor(a))),
        Op("ContrastIncreasing", True, lambda m: 9 * m / 100,
           lambda x, a: F.adjust_contrast(x, enhance_factor(a))),
        Op("BrightnessIncreasing", True, lambda m: 9 * m / 100,
           lambda x, a: F.adjust_brightness(x, enhance_factor(a))),
        Op("SharpnessIncreasing", True, lambda m: 9 * m / 100,
           lambda x, a: F.adjust_sharpness(x, enhance_factor(a))),
        Op("ShearX", True, lambda m: 3 * m / 100,                                       # +-0.27
           lambda x, a: affine(x, shear=shear(a, "x"), center=[0, 0])),
        Op("ShearY", True, lambda m: 3 * m / 100,
           lambda x, a: affine(x, shear=shear(a, "y"), center=[0, 0])),
        Op("TranslateXRel", True, lambda m: 45 * m / 1000,                              # +-0.405 of the side
           lambda x, a: affine(x, translate=(float(a) * x.shape[-1], 0.0))),
        Op("TranslateYRel", True, lambda m: 45 * m / 1000,
           lambda x, a: affine(x, translate=(0.0, float(a) * x.shape[-2]))),
    ]


class RandAugment:
    """num_ops ops drawn uniformly from `ops` (with replacement), each applied with probability p,
    at a magnitude drawn per op from N(magnitude, magnitude_std), clipped to [0, 10]. Draws from
    torch's default generator."""

    def __init__(self, ops, num_ops=2, magnitude=9.0, magnitude_std=0.5, p=0.5):
        self.ops, self.num_ops, self.magnitude, self.magnitude_std, self.p = \
            ops, num_ops, magnitude, magnitude_std, p

    def __call__(self, image):
        for _ in range(self.num_ops):
            op = self.ops[int(torch.randint(len(self.ops), ()))]
            if torch.rand(()) >= self.p:
                continue
            m = (self.magnitude + self.magnitude_std * torch.randn(())).clamp(0, 10)
            a = op.argument(m) if op.argument else None
            image = op.apply(image, -a if op.signed and torch.rand(()) < 0.5 else a)
        return image
