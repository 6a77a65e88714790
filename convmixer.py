"""ConvMixer, from "Patches Are All You Need?" (Trockman & Kolter, 2022), in plain PyTorch.

ConvMixer cuts the image into p x p patches with one strided convolution (the same thing as
ViT's linear patch embedding) and then repeats one block `depth` times at a fixed resolution
and width ("isotropic", like ViT and MLP-Mixer):

    spatial mixing:  x = x + BN(GELU(depthwise k x k conv(x)))   each channel looks at its neighbours
    channel mixing:  x = BN(GELU(1x1 conv(x)))                    each position mixes its channels

then averages over all positions and classifies with one linear layer. Convolutions take the
place of self-attention (ViT) and of the token-mixing MLP (MLP-Mixer).

    from convmixer import ConvMixer
    model = ConvMixer(dim=256, depth=8, kernel_size=9, patch_size=1, n_classes=10)
    logits = model(torch.randn(2, 3, 32, 32))                     # (2, 10)

`ConvMixer(...)` returns a plain `nn.Sequential` laid out exactly as in the paper's
"280-character" model, so its `state_dict()` keys are the published ones. Weights saved with
timm's ConvMixer (`stem.*`, `blocks.*`, `head.*`) load after `from_timm(state_dict)`;
`to_timm(state_dict)` goes the other way. The presets load the released weights with
`pretrained=True` (downloaded once into torch.hub's cache, from the Hugging Face hub or, failing
that, the authors' GitHub release); hubconf.py offers them to torch.hub.

This file imports only torch.
"""
import torch
from torch import nn


class Residual(nn.Module):
    """fn(x) + x. In ConvMixer it wraps only the depthwise (spatial-mixing) part of a block."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def patch_embedding(in_chans: int, dim: int, patch_size: int, activation=nn.GELU) -> list:
    """The stem: each non-overlapping p x p patch becomes one `dim`-vector.

    A p x p convolution with stride p is a linear map applied to every patch, i.e. ViT's
    "flatten patches, then nn.Linear". (B, in_chans, H, W) -> (B, dim, H//p, W//p).
    Returned as a list of layers because the published layout puts them at the top level.
    """
    return [
        nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
        activation(),
        nn.BatchNorm2d(dim),
    ]


def mixer_block(dim: int, kernel_size: int, activation=nn.GELU) -> nn.Sequential:
    """One ConvMixer block; shape-preserving, (B, dim, h, w) -> (B, dim, h, w)."""
    return nn.Sequential(
        # Spatial mixing: one k x k filter per channel (groups=dim), so it mixes positions but
        # never channels; the residual lets the block start close to the identity.
        Residual(nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
            activation(),
            nn.BatchNorm2d(dim),
        )),
        # Channel mixing: a 1x1 convolution is one linear layer applied at every position.
        nn.Conv2d(dim, dim, kernel_size=1),
        activation(),
        nn.BatchNorm2d(dim),
    )


def classifier_head(dim: int, n_classes: int) -> list:
    """Global average pooling, then a linear layer: (B, dim, h, w) -> (B, n_classes)."""
    return [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes)]


def ConvMixer(dim, depth, kernel_size=9, patch_size=7, n_classes=1000, *,
              in_chans=3, activation=nn.GELU) -> nn.Sequential:
    """ConvMixer-`dim`/`depth`: a plain nn.Sequential in the published layout.

    Indices: 0-2 the patch embedding (conv, activation, BatchNorm); 3 .. depth+2 the blocks;
    then AdaptiveAvgPool2d, Flatten and the Linear head at index depth+5.

    Any input size works. The patch embedding has no padding, so when H or W is not a multiple
    of `patch_size` the last H % p rows (W % p columns) are dropped, as in the original code:
    a 31x29 input with p=3 gives a 10x9 grid of patches. Inside the blocks, padding="same"
    zero-pads so the grid keeps its size; for an even kernel_size PyTorch puts the extra row
    and column of padding at the bottom and right.

    `activation` is a class or function returning a module (nn.GELU as in the paper; nn.ReLU
    for the released ConvMixer-768/32).
    """
    for name, value, minimum in [("dim", dim, 1), ("depth", depth, 0), ("kernel_size", kernel_size, 1),
                                 ("patch_size", patch_size, 1), ("n_classes", n_classes, 1),
                                 ("in_chans", in_chans, 1)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive" if minimum == 1 else "a non-negative"
            raise ValueError(f"ConvMixer: {name} must be {kind} int, got {value!r}")
    if not callable(activation):
        raise ValueError(f"ConvMixer: activation must be a callable that returns an nn.Module, "
                         f"got {activation!r}")
    return nn.Sequential(
        *patch_embedding(in_chans, dim, patch_size, activation),
        *[mixer_block(dim, kernel_size, activation) for _ in range(depth)],
        *classifier_head(dim, n_classes),
    )


# The published models, with the settings of their released weights: ImageNet-1k top-1 81.37%
# (1536/20; the official README), 80.16% (768/32; the paper) and 76.94% (1024/20), all three as
# mmpretrain's ConvMixer README lists them for these weights. pretrained=True loads the weights (PRETRAINED, below); with another
# n_classes, all but the classifier, whose new head stays freshly initialized, as for fine-tuning.

def convmixer_1536_20(n_classes=1000, pretrained=False, progress=True, **kwargs):
    model = ConvMixer(1536, 20, kernel_size=9, patch_size=7, n_classes=n_classes, **kwargs)
    return load_pretrained(model, "convmixer_1536_20", progress) if pretrained else model


def convmixer_768_32(n_classes=1000, pretrained=False, progress=True, **kwargs):
    kwargs.setdefault("activation", nn.ReLU)   # the released 768/32 weights were trained with ReLU
    model = ConvMixer(768, 32, kernel_size=7, patch_size=7, n_classes=n_classes, **kwargs)
    return load_pretrained(model, "convmixer_768_32", progress) if pretrained else model


def convmixer_1024_20(n_classes=1000, pretrained=False, progress=True, **kwargs):
    model = ConvMixer(1024, 20, kernel_size=9, patch_size=14, n_classes=n_classes, **kwargs)
    return load_pretrained(model, "convmixer_1024_20", progress) if pretrained else model


def convmixer_cifar10(pretrained=False, progress=True, **kwargs):
    """ConvMixer-256/8, kernel 9, patch 1: the paper's CIFAR-10 model (Table 4: 96.03%). Pretrained:
    train_cifar.py's 200-epoch run in this repository, 95.88% on the test set (README, Results)."""
    model = ConvMixer(256, 8, kernel_size=9, patch_size=1, n_classes=10, **kwargs)
    return load_pretrained(model, "convmixer_cifar10", progress) if pretrained else model


# Weight conversion. timm names the same layers stem.{0,2}, blocks.{i}.{0.fn.0, 0.fn.2, 1, 3}
# and head; the published layout numbers them 0-2, 3+i and depth+5. Only names change.

def _unwrap(state_dict):
    """Accept a training checkpoint ({"state_dict": ...}) and DataParallel's "module." prefix."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def from_timm(state_dict) -> dict:
    """Return a copy of a ConvMixer state_dict with the published (nn.Sequential) key names.

    Takes timm's key names or the published ones (those pass through unchanged), so
    `ConvMixer(...).load_state_dict(from_timm(sd))` works for either.
    """
    state_dict = _unwrap(state_dict)
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    converted = {}
    for key, value in state_dict.items():
        first, _, rest = key.partition(".")
        if first == "stem":
            new_key = rest                                   # stem.0.weight -> 0.weight
        elif first == "blocks":
            block, _, rest = rest.partition(".")
            new_key = f"{3 + int(block)}.{rest}"              # blocks.2.1.weight -> 5.1.weight
        elif first == "head":
            new_key = f"{depth + 5}.{rest}"                   # head.weight -> {depth+5}.weight
        elif first.isdigit():
            new_key = key                                     # already the published layout
        else:
            raise ValueError(f"from_timm: unexpected key {key!r} in state_dict")
        converted[new_key] = value
    return converted


def to_timm(state_dict) -> dict:
    """Return a copy of a published-layout state_dict with timm's ConvMixer key names."""
    state_dict = _unwrap(state_dict)
    depth = len({k.split(".")[0] for k in state_dict if ".0.fn.0." in k})
    converted = {}
    for key, value in state_dict.items():
        first, _, rest = key.partition(".")
        if not first.isdigit():
            raise ValueError(f"to_timm: key {key!r} is not in the published ConvMixer layout")
        index = int(first)
        if index < 3:
            new_key = f"stem.{key}"
        elif index < 3 + depth:
            new_key = f"blocks.{index - 3}.{rest}"
        elif index == depth + 5:
            new_key = f"head.{rest}"
        else:
            raise ValueError(f"to_timm: key {key!r} does not fit a ConvMixer of depth {depth}")
        converted[new_key] = value
    return converted


# Released weights, and the preprocessing each set was evaluated with: the authors' ImageNet-1k
# weights, from two sources tried in turn. timm serves them from the Hugging Face hub today (a plain
# state_dict in timm's key names); the GitHub release URLs, those of timm's earlier default configs,
# hold the authors' timm training checkpoints. No SHA-256 has been recorded for them yet, so none is
# checked: a source's "sha256", once known, is checked on download and named in the cached file.
IMAGENET_EVAL = {"input_size": 224, "crop_pct": 0.96, "interpolation": "bicubic",
                 "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_HUB = "https://huggingface.co/timm/{}/resolve/main/pytorch_model.bin"
_RELEASES = "https://github.com/tmp-iclr/convmixer/releases/download/timm-v1.0/"


def _sources(hub_repo, release_file):
    return [{"url": _HUB.format(hub_repo), "file": f"{hub_repo.replace('.', '_')}.bin", "sha256": None},
            {"url": _RELEASES + release_file, "sha256": None}]


PRETRAINED = {
    "convmixer_1536_20": {"sources": _sources("convmixer_1536_20.in1k", "convmixer_1536_20_ks9_p7.pth.tar"),
                          **IMAGENET_EVAL},
    "convmixer_768_32": {"sources": _sources("convmixer_768_32.in1k", "convmixer_768_32_ks7_p7_relu.pth.tar"),
                         **IMAGENET_EVAL},
    "convmixer_1024_20": {"sources": _sources("convmixer_1024_20_ks9_p14.in1k",
                                              "convmixer_1024_20_ks9_p14.pth.tar"), **IMAGENET_EVAL},
    # This repository's own: the model.pt of train_cifar.py's 200-epoch run, committed beside this
    # file (so torch.hub.load of the repository has it too); a copy without results/ has none.
    "convmixer_cifar10": {"checkout_file": "results/cifar10_convmixer_256_8_k9_p1/model.pt", "input_size": 32,
                          "mean": (0.4914, 0.4822, 0.4465), "std": (0.2471, 0.2435, 0.2616)},
}


class _TrainingArgs:
    """Stands in for the argparse.Namespace that timm's checkpoint saver stores as "args", so that
    a release loads with weights_only=True, which unpickles nothing but tensors and plain data."""


def _cached_path(source):
    """Where torch.hub keeps a source's file: its own name, with the SHA-256's start when known."""
    name = source.get("file") or source["url"].rsplit("/", 1)[-1]
    stem, _, ext = name.partition(".")
    sha256 = source.get("sha256")
    return f"{torch.hub.get_dir()}/checkpoints/{stem}-{sha256[:12]}.{ext}" if sha256 else \
        f"{torch.hub.get_dir()}/checkpoints/{name}"


def _download(source, progress):
    """The checkpoint of one source, from torch.hub's cache or downloaded into it; raises on failure."""
    with torch.serialization.safe_globals([(_TrainingArgs, "argparse.Namespace")]):
        return torch.hub.load_state_dict_from_url(
            source["url"], map_location="cpu", progress=progress, check_hash=bool(source.get("sha256")),
            file_name=_cached_path(source).rsplit("/", 1)[-1], weights_only=True)


def load_pretrained(model: nn.Sequential, name: str, progress: bool = True) -> nn.Sequential:
    """Load the released weights PRETRAINED[name] into `model` (the preset's architecture): from the
    first source already in torch.hub's cache, else downloaded from the first source that answers.
    Returns the model."""
    spec = PRETRAINED.get(name)
    if spec is None:
        raise RuntimeError(f"{name}: no pretrained weights are published for it")
    if "checkout_file" in spec:
        return _load_from_checkout(model, name, spec["checkout_file"])
    sources = spec["sources"]
    cached = [s for s in sources if _is_file(_cached_path(s))]
    failures = []
    for source in cached[:1] or sources:
        path = _cached_path(source)
        try:
            checkpoint = _download(source, progress)
            break
        except Exception as e:
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            if _is_file(path):         # a file came (or was there) but cannot be read
                raise RuntimeError(f"{name}: {path} (from {source['url']}) cannot be read as a checkpoint "
                                   f"({reason}); it may be truncated or corrupt: delete it to download it "
                                   f"again") from None
            failures.append(f"{source['url']} ({reason})")  # torch.hub keeps nothing half-written
    else:
        where = " or ".join(_cached_path(s) for s in sources)
        raise RuntimeError(f"{name}: could not download {' nor '.join(failures)}. Without network, "
                           f"download one of them elsewhere and put it at {where}")
    try:
        weights = from_timm(checkpoint)
    except (ValueError, TypeError, AttributeError) as e:
        raise RuntimeError(f"{name}: {path} is not a ConvMixer checkpoint ({e})") from None
    _load_matching(model, weights, f"{name}: {path}")
    return model


def _load_from_checkout(model, name, relative_path):
    """Weights that live in this repository, beside convmixer.py (a train_cifar.py model.pt)."""
    folder = __file__[:max(__file__.rfind("/"), __file__.rfind("\\")) + 1]
    path = folder + relative_path
    if not _is_file(path):
        raise RuntimeError(f"{name}: no pretrained weights are published for it yet ({path} is not there)")
    try:
        weights = from_timm(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise RuntimeError(f"{name}: {path} cannot be read as a checkpoint ({type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
    _load_matching(model, weights, f"{name}: {path}")
    return model


def _is_file(path):
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _load_matching(model, weights, source):
    """Load strictly, except a classifier of another size, which keeps its fresh initialization."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise RuntimeError(f"{source} does not fit this ConvMixer (missing keys {missing[:3]}, "
                           f"unexpected keys {unexpected[:3]})")
    head = f"{len(model) - 1}."                                  # the Linear classifier's keys
    skipped = []
    for key, value in weights.items():
        if value.shape != own[key].shape:
            if not key.startswith(head):
                raise RuntimeError(f"{source}: {key} has shape {tuple(value.shape)} in the checkpoint "
                                   f"and {tuple(own[key].shape)} in the model")
            skipped.append(key)
    if skipped:
        print(f"{source}: loaded all but the classifier ({weights[head + 'weight'].shape[0]} classes "
              f"there, {own[head + 'weight'].shape[0]} here), which stays freshly initialized")
    model.load_state_dict({k: v for k, v in weights.items() if k not in skipped}, strict=not skipped)
