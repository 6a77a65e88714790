"""train_cifar.py's training augmentation for a whole batch at once, on the GPU (--fast).

train_cifar.train_transform (the readable reference) augments one image at a time in CPU worker
processes: RandomResizedCrop -> horizontal flip -> RandAugment -> normalize, and RandomErasing
after MixUp/CutMix. Its speed is bounded by the CPU cores. torchvision's v2 transforms run on a GPU
batch too, but draw one set of random parameters per call, so every image of the batch would get
the same crop, ops and erased box: not the recipe. BatchAugment draws every parameter per image,
from the same distributions (tests/test_augment.py compares them), and applies them batched:

- the crop is a per-image resampling (bilinear or bicubic, as drawn), a product of two small
  weight matrices per image, with the weights of torch's antialiased resize;
- RandAugment groups the images by the op they drew; each group goes through a batched twin of
  the op in train_cifar.RANDAUGMENT_OPS (BATCHED_OPS below), with every image's own argument,
  computed by the same magnitude rule;
- the erasing (BatchAugment.erase, after mixing) is a per-image rectangle of N(0, 1) noise.

    augment = BatchAugment(train_cifar.RANDAUGMENT_OPS, mean, std)   # other defaults: the paper's
    x = augment.erase(augment(images_uint8, generator))   # (B, 3, 32, 32) uint8 -> normalized float32
"""
import math

import torch
from torch.nn.functional import grid_sample
from torchvision.transforms.v2 import functional as F

AUGMENT_CHUNK_IMAGES = 8192     # DeviceData augments this many images at a time (~100 MB of floats)


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


def resampling_weights(start, length, out, size, bicubic):
    """(B, out, size) matrices: row i weighs the input pixels start .. start+length-1 of each image
    for output pixel i, as torch's antialiased resize does when enlarging (or keeping) a crop: the
    triangle or the a = -0.5 cubic kernel, renormalized where it would reach outside the crop."""
    device = start.device
    center = (torch.arange(out, device=device) + 0.5) * (length.double() / out)[:, None]   # (B, out)
    j = torch.arange(size, device=device) - start[:, None]                               # (B, size)
    d = (j[:, None, :] + 0.5 - center[:, :, None]).abs()                                  # (B, out, size)
    a = -0.5
    cubic = torch.where(d < 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        torch.where(d < 2, (((d - 5) * d + 8) * d - 4) * a, 0.0))
    weights = torch.where(bicubic[:, None, None], cubic, (1 - d).clamp(min=0))
    weights = weights * ((j >= 0) & (j < length[:, None]))[:, None, :]
    return (weights / weights.sum(-1, keepdim=True)).float()


def resized_crop(images, top, left, h, w, bicubic, size):
    """Per-image crop (top, left, h, w) resized to `size`: (B, C, H, W) uint8 -> (B, C, *size) uint8."""
    rows = resampling_weights(top, h, size[0], images.shape[-2], bicubic)      # (B, out_h, H)
    cols = resampling_weights(left, w, size[1], images.shape[-1], bicubic)     # (B, out_w, W)
    out = rows[:, None] @ images.float() @ cols[:, None].transpose(-1, -2)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def per_image(t):
    return t[:, None, None, None]


def blend(images, degenerate, factor):
    """torchvision's blend of uint8 images with `degenerate`, one factor per image (float64)."""
    out = images.float() * per_image(factor.float()) + degenerate * per_image((1 - factor).float())
    return out.clamp_(0, 255).to(torch.uint8)


def enhance_factor(a):
    return (1 + a.double()).clamp(min=0.1)          # as randaugment.py's enhance_factor


def sharpness(images, a):
    """F.adjust_sharpness with one factor per image: x + (1 - factor) * (blurred - x) inside."""
    alpha = per_image((1 - enhance_factor(a)).float())
    x = images.float()
    out = x + alpha * (F.adjust_sharpness(images, 0.0).float() - x)
    return out.clamp_(0, 255).to(torch.uint8)


def affine(images, fill, angle=None, translate=None, shear=None, center=(0.0, 0.0)):
    """F.affine(bilinear, fill) with one angle (degrees), translation (pixels) and shear
    (radians) per image: torchvision's inverse matrix, grid and fill, batched."""
    n, (height, width), device = len(images), images.shape[-2:], images.device
    zero = torch.zeros(n, dtype=torch.float64, device=device)
    rot = torch.deg2rad(angle.double()) if angle is not None else zero
    tx, ty = (t.double() for t in translate) if translate is not None else (zero, zero)
    sx, sy = (s.double() for s in shear) if shear is not None else (zero, zero)
    cx, cy = center                            # relative to the image centre, as torchvision's
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    theta = torch.stack([torch.stack([d, -b, d * (-cx - tx) - b * (-cy - ty) + cx], -1),
                         torch.stack([-c, a, -c * (-cx - tx) + a * (-cy - ty) + cy], -1)], 1).float()
    base = torch.ones(height, width, 3, device=device)
    base[..., 0] = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device)
    base[..., 1] = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=device)[:, None]
    scale = torch.tensor([0.5 * width, 0.5 * height], device=device)
    grid = (base.view(1, -1, 3) @ (theta.transpose(1, 2) / scale)).view(n, height, width, 2)
    x = torch.cat([images.float(), torch.ones_like(images[:, :1], dtype=torch.float32)], 1)
    x, mask = grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).split([3, 1], 1)
    fill = torch.tensor(fill, device=device).view(1, -1, 1, 1)
    return ((x - fill) * mask + fill).round_().to(torch.uint8)


def shear_radians(a):
    return torch.atan(a.double())              # timm's shear factor as an angle


def gray(images):
    return F.rgb_to_grayscale(images.float()).floor_()                     # (B, 1, H, W)


# The batched twin of each op in train_cifar.RANDAUGMENT_OPS: (images, arguments (B,), fill) -> images.
BATCHED_OPS = {
    "AutoContrast": lambda x, a, fill: F.autocontrast(x),
    "Equalize": lambda x, a, fill: F.equalize(x),
    "Invert": lambda x, a, fill: F.invert(x),
    "Rotate": lambda x, a, fill: affine(x, fill, angle=a),
    "PosterizeIncreasing": lambda x, a, fill: x & per_image(                # keep the top a bits
        (torch.full_like(a, 255, dtype=torch.int32) << (8 - a.int())).bitwise_and(255).to(torch.uint8)),
    "SolarizeIncreasing": lambda x, a, fill: torch.where(x >= per_image(a), 255 - x, x),
    "SolarizeAdd": lambda x, a, fill: torch.where(
        x < 128, (x.int() + per_image(a.int())).clamp(max=255), x).to(torch.uint8),
    "ColorIncreasing": lambda x, a, fill: blend(x, gray(x), enhance_factor(a)),
    "ContrastIncreasing": lambda x, a, fill: blend(
        x, gray(x).mean(dim=(-3, -2, -1), keepdim=True), enhance_factor(a)),
    "BrightnessIncreasing": lambda x, a, fill: blend(x, torch.zeros_like(x, dtype=torch.float32),
                                                     enhance_factor(a)),
    "SharpnessIncreasing": lambda x, a, fill: sharpness(x, a),
    "ShearX": lambda x, a, fill: affine(x, fill, shear=(shear_radians(a), torch.zeros_like(a)),
                                        center=(-x.shape[-1] / 2, -x.shape[-2] / 2)),
    "ShearY": lambda x, a, fill: affine(x, fill, shear=(torch.zeros_like(a), shear_radians(a)),
                                        center=(-x.shape[-1] / 2, -x.shape[-2] / 2)),
    "TranslateXRel": lambda x, a, fill: affine(x, fill, translate=(a * x.shape[-1], torch.zeros_like(a))),
    "TranslateYRel": lambda x, a, fill: affine(x, fill, translate=(torch.zeros_like(a), a * x.shape[-2])),
}


class BatchAugment:
    """Per-image RandomResizedCrop, flip, RandAugment (`ops`: train_cifar.RANDAUGMENT_OPS),
    normalization and RandomErasing. RandAugment fills with the mean colour, round(255 * mean)."""

    def __init__(self, ops, mean, std, size=(32, 32), scale=0.75, ra_n=2, ra_m=9.0, ra_mstd=0.5,
                 ra_p=0.5, reprob=0.25):
        missing = [op.name for op in ops if op.name not in BATCHED_OPS]
        if missing:
            raise ValueError(f"BatchAugment: no batched version of the RandAugment ops {missing}")
        self.ops, self.size, self.scale, self.reprob = ops, size, (scale, 1.0), reprob
        self.ra_n, self.ra_m, self.ra_mstd, self.ra_p = ra_n, ra_m, ra_mstd, ra_p
        self.fill = [float(round(255 * m)) for m in mean]
        self.mean, self.std = mean, std

    def sample(self, n, generator, device):
        """Every random choice for n images, as a dict of (n,)-shaped tensors."""
        def rand():
            return torch.rand(n, generator=generator, device=device)
        top, left, h, w = sample_crops(n, self.size, self.scale, generator, device)
        params = dict(top=top, left=left, h=h, w=w, bicubic=rand() < 0.5, flip=rand() < 0.5)
        for k in range(self.ra_n):
            params[f"op{k}"] = torch.randint(len(self.ops), (n,), generator=generator, device=device)
            params[f"apply{k}"] = rand() < self.ra_p
            noise = torch.randn(n, generator=generator, device=device)
            params[f"magnitude{k}"] = (self.ra_m + self.ra_mstd * noise).clamp(0, 10)
            params[f"negative{k}"] = rand() < 0.5
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

    def randaugment(self, images, op, apply, magnitude, negative):
        """Op op[i] at magnitude[i] (argument negated where negative[i], for signed ops) on image i
        where apply[i]: one batched call per op drawn; one host sync in all."""
        skip = len(self.ops)
        group = torch.where(apply, op, skip)
        order = torch.argsort(group)
        counts = torch.bincount(group, minlength=skip + 1).tolist()
        out = images.clone()
        for g, index in enumerate(order.split(counts)):
            if g == skip or not len(index):
                continue
            spec = self.ops[g]
            a = spec.argument(magnitude[index]) if spec.argument else None
            if spec.signed:
                a = torch.where(negative[index], -a, a)
            out[index] = BATCHED_OPS[spec.name](images[index], a, self.fill)
        return out

    def __call__(self, images, generator, params=None):
        """(B, 3, H, W) uint8 on any device -> (B, 3, *size) normalized float32, not yet erased."""
        p = params if params is not None else self.sample(len(images), generator, images.device)
        x = resized_crop(images, p["top"], p["left"], p["h"], p["w"], p["bicubic"], self.size)
        x = torch.where(per_image(p["flip"]), x.flip(-1), x)                  # horizontal: width
        for k in range(self.ra_n):
            x = self.randaugment(x, p[f"op{k}"], p[f"apply{k}"], p[f"magnitude{k}"], p[f"negative{k}"])
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() / 255 - mean) / std

    def erase(self, x, generator=None, params=None):
        """RandomErasing of each image of a (mixed) batch in its own box, filled with N(0, 1) noise;
        generator None: the device's default generator."""
        p = params if params is not None else self.sample_erasing(len(x), generator, x.device)
        rows = torch.arange(self.size[0], device=x.device)[None, :, None]
        cols = torch.arange(self.size[1], device=x.device)[None, None, :]
        top, left = p["erase_top"][:, None, None], p["erase_left"][:, None, None]
        box = ((rows >= top) & (rows < top + p["erase_h"][:, None, None]) & (cols >= left)
               & (cols < left + p["erase_w"][:, None, None]) & p["erase"][:, None, None])   # (B, H, W)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return torch.where(box[:, None], noise, x)


class DeviceData:
    """--fast: the uint8 training images held on the device and augmented there, a chunk of batches
    at a time: a call issues the same operations and host syncs for 8,192 images as for 512."""

    def __init__(self, images, labels, args, ops, mean, std, device):
        self.images, self.labels = images.to(device), labels.to(device)
        self.augment = BatchAugment(ops, mean, std, scale=args.scale, ra_n=args.ra_n, ra_m=args.ra_m,
                                    ra_mstd=args.ra_mstd, ra_p=args.ra_p, reprob=args.reprob)

    def batches(self, order, image_seeds, batch_size, steps, chunk_images=None):
        """The epoch's (B, 3, 32, 32) float images, not yet erased, and (B,) labels. A chunk's draws
        come from the seed of its first image."""
        generator, order = torch.Generator(self.images.device), order.to(self.images.device)
        b, chunk = batch_size, max(1, (chunk_images or AUGMENT_CHUNK_IMAGES) // batch_size)   # steps a chunk
        for start in range(0, steps, chunk):
            index = order[start * b:min(start + chunk, steps) * b]
            generator.manual_seed(int(image_seeds[start * b]))
            x, y = self.augment(self.images[index], generator), self.labels[index]
            for s in range(0, len(index), b):
                yield x[s:s + b], y[s:s + b]

    def erase(self, images, p):
        return self.augment.erase(images) if p > 0 else images
