"""The training augmentation of train_cifar.py, for a whole batch at once on the GPU.

train_cifar.train_transform (the readable reference) augments one image at a time in CPU worker
processes: RandomResizedCrop -> horizontal flip -> RandAugment -> normalize -> RandomErasing.
Its speed is bounded by the CPU cores, not by the GPU. torchvision.transforms.v2 can run on a
GPU batch, but it draws one set of random parameters per call, so every image of the batch would
get the same crop, the same ops and the same erased box: not the recipe. BatchAugment draws every
parameter per image, from the same distributions as v2 (test_convmixer.py compares them), and
applies them batched:

- the crop and resize is a per-image bilinear resampling, written out below;
- RandAugment with a fixed magnitude has only 14 ops x 2 signs (and "not applied"), so images
  are grouped by (op, sign) and each group goes through torchvision's own functional op, with
  the arguments that train_cifar.randaugment_op gives v2.RandAugment;
- the erasing is a per-image rectangle mask filled with N(0, 1) noise.

    augment = BatchAugment(mean, std)             # other defaults: the paper's recipe
    x = augment(images_uint8, generator)          # (B, 3, 32, 32) uint8 -> normalized float32
"""
import math

import torch
from torchvision.transforms.v2 import functional as F

NUM_MAGNITUDE_BINS = 11                      # timm's 0-10 magnitude scale, as in train_cifar.py


def randaugment_ops(magnitude, size, fill):
    """torchvision's 14 RandAugment ops, in its order, as (name, signed, m, fn): m is the op's
    magnitude for `magnitude` (0-10) on images of `size` = (H, W), or None for ops without one;
    fn(images, m or -m) applies the op to a batch of uint8 images, bilinear and filling with the
    colour `fill` where the image moves (train_cifar.randaugment_op)."""
    height, width = size
    bins = NUM_MAGNITUDE_BINS

    def level(top):                           # torchvision: linspace(0, top, bins)[magnitude]
        return float(torch.linspace(0.0, top, bins)[magnitude])

    shear = level(0.3)
    tone = level(0.9)
    fill = [float(f) for f in fill]
    bilinear = F.InterpolationMode.BILINEAR
    affine = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                  interpolation=bilinear, fill=fill)
    return [
        ("Identity", False, None, lambda x, m: x),
        ("ShearX", True, shear, lambda x, m: F.affine(
            x, **(affine | dict(shear=[math.degrees(math.atan(m)), 0.0])), center=[0, 0])),
        ("ShearY", True, shear, lambda x, m: F.affine(
            x, **(affine | dict(shear=[0.0, math.degrees(math.atan(m))])), center=[0, 0])),
        ("TranslateX", True, level(150.0 / 331.0 * width),
         lambda x, m: F.affine(x, **(affine | dict(translate=[int(m), 0])))),
        ("TranslateY", True, level(150.0 / 331.0 * height),
         lambda x, m: F.affine(x, **(affine | dict(translate=[0, int(m)])))),
        ("Rotate", True, level(30.0),
         lambda x, m: F.rotate(x, angle=m, interpolation=bilinear, fill=fill)),
        ("Brightness", True, tone, lambda x, m: F.adjust_brightness(x, 1.0 + m)),
        ("Color", True, tone, lambda x, m: F.adjust_saturation(x, 1.0 + m)),
        ("Contrast", True, tone, lambda x, m: F.adjust_contrast(x, 1.0 + m)),
        ("Sharpness", True, tone, lambda x, m: F.adjust_sharpness(x, 1.0 + m)),
        ("Posterize", False, float(int((8 - torch.arange(bins) / ((bins - 1) / 4)).round()[magnitude])),
         lambda x, m: F.posterize(x, bits=int(m))),
        ("Solarize", False, float(torch.linspace(1.0, 0.0, bins)[magnitude]),
         lambda x, m: F.solarize(x, threshold=255.0 * m)),
        ("AutoContrast", False, None, lambda x, m: F.autocontrast(x)),
        ("Equalize", False, None, lambda x, m: F.equalize(x)),
    ]


def uniform(shape, low, high, generator, device):
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def randint_below(high, generator):
    """Per-element uniform integer in [0, high) for a tensor `high` (like torch.randint)."""
    u = torch.rand(high.shape, generator=generator, device=high.device)
    return (u * high).floor().long().clamp(max=high - 1)


def first_true(valid):
    """Index of the first True along the last dimension (0 where none), and whether any."""
    index = torch.arange(valid.shape[-1], device=valid.device)
    first = torch.where(valid, index, valid.shape[-1]).amin(-1)
    return first.clamp(max=valid.shape[-1] - 1), valid.any(-1)


def sample_boxes(n, height, width, scale, log_ratio, generator, device, attempts=10):
    """The candidate boxes of torchvision's "up to 10 tries" sampling (RandomResizedCrop,
    RandomErasing), all tries drawn at once: target areas and aspect ratios, each (n, attempts).
    The caller keeps each image's first valid try."""
    area = height * width
    target = area * uniform((n, attempts), scale[0], scale[1], generator, device)
    aspect = torch.exp(uniform((n, attempts), log_ratio[0], log_ratio[1], generator, device))
    return target, aspect


def sample_crops(n, size, scale, generator, device):
    """RandomResizedCrop(size, scale, ratio=(3/4, 4/3)) parameters for n images: top, left, h, w."""
    height, width = size
    target, aspect = sample_boxes(n, height, width, scale,
                                  (math.log(3 / 4), math.log(4 / 3)), generator, device)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    try_, ok = first_true((w > 0) & (w <= width) & (h > 0) & (h <= height))
    pick = lambda t: t.gather(1, try_[:, None])[:, 0].long()  # noqa: E731
    h, w = pick(h), pick(w)
    # No valid try: torchvision falls back to a central crop (the whole image when the image's
    # own aspect ratio lies within (3/4, 4/3), as CIFAR-10's does).
    h = torch.where(ok, h, height)
    w = torch.where(ok, w, width)
    top = torch.where(ok, randint_below(height - h + 1, generator), (height - h) // 2)
    left = torch.where(ok, randint_below(width - w + 1, generator), (width - w) // 2)
    return top, left, h, w


def resized_crop(images, top, left, h, w, size):
    """Per-image crop + bilinear resize to `size`, as F.resized_crop(antialias=True) does for
    enlargements: each output pixel's centre is mapped into the crop, and sample coordinates are
    clamped to the crop, so pixels outside it are never read. (B, C, H, W) uint8 -> same."""
    out_h, out_w = size

    def axis(start, length, out):             # (B,) -> lower index, upper index, weight: (B, out)
        scale = length.float() / out
        src = ((torch.arange(out, device=images.device) + 0.5) * scale[:, None] - 0.5).clamp(min=0)
        lo = src.floor().long()
        hi = torch.minimum(lo + 1, length[:, None] - 1)
        return start[:, None] + lo, start[:, None] + hi, src - lo

    y0, y1, wy = axis(top, h, out_h)
    x0, x1, wx = axis(left, w, out_w)
    x = images.float()
    batch = torch.arange(len(images), device=images.device)[:, None, None]
    channel_last = x.permute(0, 2, 3, 1)                                 # (B, H, W, C)

    def at(ys, xs):                                                      # -> (B, out_h, out_w, C)
        return channel_last[batch, ys[:, :, None], xs[:, None, :]]

    wy, wx = wy[:, :, None, None], wx[:, None, :, None]
    top_row = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom_row = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    out = top_row * (1 - wy) + bottom_row * wy
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 3, 1, 2).contiguous()


class BatchAugment:
    """Per-image RandomResizedCrop, flip, RandAugment, normalization and RandomErasing.
    RandAugment fills with the mean colour, round(255 * mean), as train_cifar.py does."""

    def __init__(self, mean, std, size=(32, 32), scale=0.75, ra_n=2, ra_m=9, ra_p=0.5, reprob=0.25):
        self.size, self.scale, self.reprob = size, (scale, 1.0), reprob
        self.ra_n, self.ra_p = ra_n, ra_p
        self.ops = randaugment_ops(ra_m, size, fill=[round(255 * m) for m in mean])
        self.mean, self.std = mean, std

    def sample(self, n, generator, device):
        """Every random choice for n images, as a dict of (n,)-shaped tensors."""
        top, left, h, w = sample_crops(n, self.size, self.scale, generator, device)
        params = dict(top=top, left=left, h=h, w=w,
                      flip=torch.rand(n, generator=generator, device=device) < 0.5)
        for k in range(self.ra_n):
            params[f"op{k}"] = torch.randint(len(self.ops), (n,), generator=generator, device=device)
            params[f"negative{k}"] = torch.rand(n, generator=generator, device=device) <= 0.5
            params[f"apply{k}"] = torch.rand(n, generator=generator, device=device) < self.ra_p
        params.update(self.sample_erasing(n, generator, device))
        return params

    def sample_erasing(self, n, generator, device):
        """RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3)) boxes; erase=False: untouched."""
        height, width = self.size
        target, aspect = sample_boxes(n, height, width, (0.02, 0.33),
                                      (math.log(0.3), math.log(3.3)), generator, device)
        h = torch.round(torch.sqrt(target * aspect))
        w = torch.round(torch.sqrt(target / aspect))
        try_, ok = first_true((h < height) & (w < width))
        h = h.gather(1, try_[:, None])[:, 0].long()
        w = w.gather(1, try_[:, None])[:, 0].long()
        apply = torch.rand(n, generator=generator, device=device) < self.reprob
        return dict(erase=apply & ok,
                    erase_top=randint_below((height - h + 1).clamp(min=1), generator),
                    erase_left=randint_below((width - w + 1).clamp(min=1), generator),
                    erase_h=h, erase_w=w)

    def randaugment(self, images, ops, negative, apply):
        """Apply op ops[i] (negative magnitude if negative[i]) to image i where apply[i]: images
        are grouped by (op, sign) and each group goes through one torchvision call; one host sync
        in all."""
        skip = 2 * len(self.ops)
        group = torch.where(apply, ops * 2 + negative.long(), skip)  # (op, sign) -> 0 .. 27; 28: none
        order = torch.argsort(group)
        counts = torch.bincount(group, minlength=skip + 1).tolist()
        out = torch.empty_like(images)
        for g, index in enumerate(order.split(counts)):
            if g == skip:
                out[index] = images[index]
            elif len(index):
                _, signed, magnitude, fn = self.ops[g // 2]
                m = -magnitude if signed and g % 2 else magnitude   # unsigned ops ignore the sign
                out[index] = fn(images[index], m)
        return out

    def __call__(self, images, generator, params=None):
        """(B, 3, H, W) uint8 on any device -> (B, 3, *size) normalized float32."""
        p = params if params is not None else self.sample(len(images), generator, images.device)
        x = resized_crop(images, p["top"], p["left"], p["h"], p["w"], self.size)
        x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)
        for k in range(self.ra_n):
            x = self.randaugment(x, p[f"op{k}"], p[f"negative{k}"], p[f"apply{k}"])
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x.float() / 255 - mean) / std
        rows = torch.arange(self.size[0], device=x.device)[None, :, None]
        cols = torch.arange(self.size[1], device=x.device)[None, None, :]
        box = ((rows >= p["erase_top"][:, None, None]) & (rows < (p["erase_top"] + p["erase_h"])[:, None, None])
               & (cols >= p["erase_left"][:, None, None]) & (cols < (p["erase_left"] + p["erase_w"])[:, None, None])
               & p["erase"][:, None, None])
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return torch.where(box[:, None], noise, x)
