"""The test suite: `pytest -q` (runs on CPU in a few minutes).

Model tests use only torch. Trainer tests run train_cifar.py as a user would, on a small slice
of the real CIFAR-10 when CIFAR10_ROOT (or ./data) holds it, else on torchvision's FakeData.
"""
import copy
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    # Run fast/depthwise.py's Triton kernels on the CPU; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import convmixer
from convmixer import ConvMixer, Residual, from_timm, to_timm

HERE = Path(__file__).resolve().parent
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


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
# Pretrained weights: convmixer.load_pretrained, the presets' pretrained=True, hubconf.py. The
# "releases" are made here in the official format (timm's checkpoint saver: timm key names, the
# optimizer and the run's argparse.Namespace), served from file:// URLs or a local HTTP server.

def timm_release(path, model, n_classes=1000):
    """Save `model` as timm's checkpoint saver does; return the file's SHA-256."""
    import argparse
    import hashlib
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    torch.save({"epoch": 149, "arch": "convmixer", "state_dict": to_timm(model.state_dict()),
                "optimizer": optimizer.state_dict(), "version": 2, "metric": 81.37,
                "args": argparse.Namespace(model="convmixer", lr=0.01, aa="rand-m9-mstd0.5-inc1")}, path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A small ConvMixer released as PRETRAINED["small"] (one source, a file:// URL); torch.hub's
    cache in tmp."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    torch.manual_seed(0)
    model = randomize_(ConvMixer(16, 2, 3, 4, n_classes=1000))
    path = tmp_path / "convmixer_small_ks3_p4.pth.tar"
    sha256 = timm_release(path, model)
    spec = {"sources": [{"url": path.as_uri(), "sha256": sha256}], **convmixer.IMAGENET_EVAL}
    monkeypatch.setitem(convmixer.PRETRAINED, "small", spec)
    return model.eval(), path, spec


def with_source(spec, **changes):
    """spec with its one source changed."""
    return {**spec, "sources": [{**spec["sources"][0], **changes}]}


def cached_files():
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_pretrained_weights_load_once_and_give_the_released_outputs(release):
    model, path, spec = release
    x = torch.randn(2, 3, 32, 32)
    loaded = convmixer.load_pretrained(ConvMixer(16, 2, 3, 4), "small", progress=False).eval()
    assert torch.equal(loaded(x), model(x))
    assert cached_files() == [f"convmixer_small_ks3_p4-{spec['sources'][0]['sha256'][:12]}.pth.tar"]  # hash
    path.unlink()                                                    # downloaded once: the cache serves
    again = convmixer.load_pretrained(ConvMixer(16, 2, 3, 4), "small", progress=False).eval()
    assert torch.equal(again(x), model(x))


def test_pretrained_without_a_recorded_hash_is_cached_under_its_own_name(release, monkeypatch):
    model, path, spec = release
    monkeypatch.setitem(convmixer.PRETRAINED, "small", with_source(spec, sha256=None))
    convmixer.load_pretrained(ConvMixer(16, 2, 3, 4), "small", progress=False)
    assert cached_files() == [path.name]


def test_pretrained_with_other_classes_keeps_a_fresh_head_and_says_so(release, capsys):
    model, _, _ = release
    torch.manual_seed(1)
    fresh = ConvMixer(16, 2, 3, 4, n_classes=10)
    head = fresh[-1].weight.detach().clone()
    convmixer.load_pretrained(fresh, "small", progress=False)
    assert torch.equal(fresh[-1].weight, head)                       # untouched, freshly initialized
    for key, value in model.state_dict().items():
        if not key.startswith(f"{len(model) - 1}."):
            assert torch.equal(fresh.state_dict()[key], value), key
    out = capsys.readouterr().out
    assert out.count("freshly initialized") == 1 and "1000 classes there, 10 here" in out


def test_pretrained_shape_mismatch_names_the_key_and_both_shapes(release):
    with pytest.raises(RuntimeError, match=r"0\.weight has shape \(16, 3, 4, 4\) in the checkpoint and "
                                           r"\(32, 3, 4, 4\) in the model"):
        convmixer.load_pretrained(ConvMixer(32, 2, 3, 4), "small", progress=False)
    with pytest.raises(RuntimeError, match="does not fit this ConvMixer"):           # another depth
        convmixer.load_pretrained(ConvMixer(16, 3, 3, 4), "small", progress=False)


def serve_once(payload):
    """A local HTTP server on 127.0.0.1 that answers every GET with `payload`; returns its URL."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/convmixer_small_ks3_p4.pth.tar"


def test_pretrained_bad_downloads_fail_in_one_line_and_leave_nothing_behind(release, monkeypatch, tmp_path):
    model, path, spec = release
    cases = []
    # No network: a local port that refuses connections.
    cases.append((with_source(spec, url="http://127.0.0.1:9/convmixer_small_ks3_p4.pth.tar"),
                  "could not download http://127.0.0.1:9/", True))
    # A download cut short: its SHA-256 does not match; torch.hub keeps nothing half-written.
    server, url = serve_once(path.read_bytes()[:5000])
    cases.append((with_source(spec, url=url), "invalid hash value", True))
    # A wrong recorded hash.
    cases.append((with_source(spec, sha256="0" * 64), "invalid hash value", True))
    # A file that is not a ConvMixer checkpoint.
    foreign = tmp_path / "foreign.pth.tar"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, foreign)
    cases.append((with_source(spec, url=foreign.as_uri(), sha256=None), "is not a ConvMixer checkpoint",
                  False))
    # A file that would run code when unpickled: weights_only refuses it.
    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": Residual(nn.Identity())}, evil)
    cases.append((with_source(spec, url=evil.as_uri(), sha256=None), "cannot be read as a checkpoint", False))
    try:
        for entry, expected, nothing_kept in cases:
            monkeypatch.setitem(convmixer.PRETRAINED, "small", entry)
            with pytest.raises(RuntimeError) as e:
                convmixer.load_pretrained(ConvMixer(16, 2, 3, 4), "small", progress=False)
            message = str(e.value)
            assert expected in message and "\n" not in message, message
            assert entry["sources"][0]["url"] in message or Path(torch.hub.get_dir()).as_posix() in message, \
                message
            if nothing_kept:
                assert cached_files() == [], (expected, cached_files())
                assert str(Path(torch.hub.get_dir()) / "checkpoints") in message or "hash" in message
    finally:
        server.shutdown()
    # Without a hash, a download cut short is found when it is read: the message names the file.
    server, url = serve_once(path.read_bytes()[:5000])
    monkeypatch.setitem(convmixer.PRETRAINED, "small", with_source(spec, url=url, sha256=None))
    try:
        with pytest.raises(RuntimeError, match="cannot be read as a checkpoint.*delete it") as e:
            convmixer.load_pretrained(ConvMixer(16, 2, 3, 4), "small", progress=False)
        assert str(Path(torch.hub.get_dir()) / "checkpoints" / path.name) in str(e.value)
    finally:
        server.shutdown()


def test_pretrained_tries_the_hub_first_and_the_release_second(release, monkeypatch):
    """Two sources, as PRETRAINED has them: the Hugging Face hub's plain state_dict in timm's names,
    then the authors' release (a timm training checkpoint). Local servers stand in for both."""
    import io
    model, path, spec = release
    x = torch.randn(2, 3, 32, 32)
    state_dict = io.BytesIO()
    torch.save(to_timm(model.state_dict()), state_dict)
    hub_server, hub_url = serve_once(state_dict.getvalue())
    hub_url = hub_url.rsplit("/", 1)[0] + "/timm/convmixer_small.in1k/resolve/main/pytorch_model.bin"
    release_server, release_url = serve_once(path.read_bytes())
    down = "http://127.0.0.1:9/"                                    # a port that refuses connections
    hub_down = down + "timm/convmixer_small.in1k/resolve/main/pytorch_model.bin"
    release_down = down + path.name

    def use(hub, release):
        monkeypatch.setitem(convmixer.PRETRAINED, "small", {**spec, "sources": [
            {"url": hub, "file": "convmixer_small_in1k.bin", "sha256": None},
            {"url": release, "sha256": None}]})

    def load():
        return convmixer.load_pretrained(ConvMixer(16, 2, 3, 4), "small", progress=False).eval()

    try:
        use(hub_url, release_down)                                  # the hub answers: its file
        assert torch.equal(load()(x), model(x)) and cached_files() == ["convmixer_small_in1k.bin"]
        shutil.rmtree(Path(torch.hub.get_dir()) / "checkpoints")
        use(hub_down, release_url)                                  # the hub down: the release
        assert torch.equal(load()(x), model(x)) and cached_files() == [path.name]
        use(hub_down, release_down)                                 # both down: the cache serves
        assert torch.equal(load()(x), model(x))
        shutil.rmtree(Path(torch.hub.get_dir()) / "checkpoints")
        with pytest.raises(RuntimeError) as e:                       # both down, nothing cached
            load()
        message = str(e.value)
        assert "\n" not in message and f"could not download {hub_down} (" in message
        assert f" nor {release_down} (" in message and "put it at " in message
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        assert f"{checkpoints / 'convmixer_small_in1k.bin'} or {checkpoints / path.name}" in message
        assert cached_files() == []
    finally:
        hub_server.shutdown()
        release_server.shutdown()


def test_cifar10_weights_load_from_the_checkout_once_committed(tmp_path, monkeypatch):
    """convmixer_cifar10(pretrained=True) reads the 200-epoch run's model.pt (train_cifar.py's format)
    from the repository, with no network; until it is committed it says so."""
    spec = convmixer.PRETRAINED["convmixer_cifar10"]
    committed = HERE / spec["checkout_file"]
    assert spec["checkout_file"] == "results/cifar10_convmixer_256_8_k9_p1/model.pt"
    if committed.exists():
        assert storage_locations(committed) == {"cpu"}          # trained on a GPU, loads anywhere
        model = convmixer.convmixer_cifar10(pretrained=True)
        saved = torch.load(committed, weights_only=True)["state_dict"]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    else:
        with pytest.raises(RuntimeError, match="no pretrained weights are published for it yet"):
            convmixer.convmixer_cifar10(pretrained=True)
    trained = randomize_(ConvMixer(256, 8, 9, 1, n_classes=10), seed=3)
    folder = tmp_path / "checkout"
    (folder / "results").mkdir(parents=True)
    torch.save({"state_dict": trained.state_dict(), "config": {"hdim": 256}}, folder / "results" / "model.pt")
    monkeypatch.setattr(convmixer, "__file__", str(folder / "convmixer.py"))
    monkeypatch.setitem(convmixer.PRETRAINED, "convmixer_cifar10",
                        {**spec, "checkout_file": "results/model.pt"})
    loaded = convmixer.convmixer_cifar10(pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), trained.eval()(x))


def test_presets_take_pretrained_and_the_preprocessing_is_at_hand(monkeypatch):
    calls = []
    monkeypatch.setattr(convmixer, "load_pretrained", lambda model, name, progress: calls.append(name) or model)
    for name in ("convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"):
        assert isinstance(getattr(convmixer, name)(pretrained=True), nn.Sequential)
        spec = convmixer.PRETRAINED[name]
        hub, release = (source["url"] for source in spec["sources"])
        assert hub.startswith("https://huggingface.co/timm/convmixer_") and hub.endswith("/pytorch_model.bin")
        assert release.startswith("https://github.com/") and release.endswith(".pth.tar")
        assert spec["input_size"] == 224 and spec["crop_pct"] == 0.96
        assert spec["interpolation"] == "bicubic" and len(spec["mean"]) == len(spec["std"]) == 3
    assert calls == ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"]
    assert convmixer.convmixer_cifar10() is not None and calls == calls[:3]     # False: no download


def test_torch_hub_loads_this_repository():
    model = torch.hub.load(str(HERE), "convmixer_cifar10", source="local", trust_repo=True)
    assert isinstance(model, nn.Sequential) and model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    small = torch.hub.load(str(HERE), "ConvMixer", 8, 1, source="local", trust_repo=True, n_classes=5)
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    import hubconf
    assert hubconf.dependencies == ["torch"]
    assert all(callable(getattr(hubconf, name)) for name in convmixer.PRETRAINED)
    if not (HERE / convmixer.PRETRAINED["convmixer_cifar10"]["checkout_file"]).exists():
        with pytest.raises(RuntimeError, match="convmixer_cifar10: no pretrained weights are published"):
            torch.hub.load(str(HERE), "convmixer_cifar10", source="local", trust_repo=True, pretrained=True)
    else:
        model = torch.hub.load(str(HERE), "convmixer_cifar10", source="local", trust_repo=True,
                               pretrained=True)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_readme_pretrained_snippets_run_as_written(tmp_path, monkeypatch):
    """The README's pretrained snippets, with local files standing in for the three downloads."""
    import re
    from PIL import Image
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    for name in ("convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"):
        release = tmp_path / f"{name}.pth.tar"
        torch.save({"state_dict": to_timm(getattr(convmixer, name)().state_dict())}, release)
        monkeypatch.setitem(convmixer.PRETRAINED, name,
                            {**convmixer.PRETRAINED[name], "sources": [{"url": release.as_uri()}]})
    monkeypatch.chdir(tmp_path)
    Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8).numpy()).save("photo.jpg")
    readme = (HERE / "README.md").read_text()
    snippets = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "pretrained=True" in block]
    assert len(snippets) == 5 and 'CIFAR10("data"' in snippets[0]
    if REAL_DATA:                                  # the CIFAR-10 snippet reads ./data's test set
        (tmp_path / "data").symlink_to(Path(REAL_DATA).resolve())
    results = []
    for code in snippets if REAL_DATA else snippets[1:]:
        namespace = {}
        exec(code.replace("path/to/this/checkout", str(HERE)), namespace)
        results.append(namespace)
    if REAL_DATA:
        cifar = results.pop(0)
        assert cifar["label"] == 3 and cifar["probabilities"].argmax() == 3, cifar["probabilities"]
    inference, fine_tuning, features, hub = results
    assert inference["top5"].indices.shape == (1, 5) and (inference["top5"].values > 0).all()
    assert fine_tuning["model"][-1].out_features == 10
    assert features["feature_map"].shape == (2, 1024, 16, 16) and features["embedding"].shape == (2, 1024)
    torch.testing.assert_close(features["embedding"], features["feature_map"].mean((2, 3)))
    with torch.no_grad():
        torch.testing.assert_close(features["model"][-1](features["embedding"]), features["model"](features["x"]))
    assert isinstance(hub["model"], nn.Sequential) and hub["model"][0].kernel_size == (14, 14)


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
        "--batch-size", "128", "--device", "cpu", "--seed", "0", "--eval-every", "2", *DATA]
TINY += ["--subset", "3000"] if REAL_DATA else []


def run_script(*args, check=True, timeout=600):
    result = subprocess.run([sys.executable, str(HERE / "train_cifar.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def storage_locations(path):
    """The devices that a checkpoint's tensors were saved from: torch.load puts each back there, so
    a file with "cuda:0" in it loads on a machine without a GPU only given a map_location."""
    found = set()
    torch.load(path, weights_only=True, map_location=lambda storage, location: found.add(location) or storage)
    return found


def without_timings(records):
    timing = {"epoch_seconds", "images_per_second", "wall_seconds"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records
            if "train_loss" in r or r.get("final")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_script(*TINY, "--workers", "0", "--out", out)
    return out, result


def test_checkpoints_are_written_from_the_cpu_through_every_container(tmp_path):
    """save_atomic (last.pt, model.pt) saves each tensor from the CPU, found inside dicts, lists and
    tuples as a model's and AdamW's state_dicts hold them, and leaves everything else as it is; so
    a file written on a GPU loads with a plain torch.load on any machine (the GPU test of the step
    modes checks files written from CUDA)."""
    from trainer.files import on_cpu, save_atomic
    weight = torch.randn(3, 2, requires_grad=True)
    obj = {"state_dict": {"0.weight": weight, "1.num_batches_tracked": torch.tensor(7)},
           "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.ones(3, 2)}},
                         "param_groups": [{"params": [0], "lr": torch.tensor(0.5, requires_grad=True),
                                           "betas": (0.9, 0.999)}]},
           "epoch": 3, "sums": {"loss": 1.5, "seen": 64}, "name": None, "shapes": [(1, 2), [3]],
           "pair": (torch.ones(2, requires_grad=True), 4)}
    copied = on_cpu(obj)           # on a CPU, .cpu() returns the tensor itself: detach() shows the copy
    assert not copied["state_dict"]["0.weight"].requires_grad and torch.equal(copied["state_dict"]["0.weight"], weight)
    group = copied["optimizer"]["param_groups"][0]
    assert group["params"] == [0] and group["betas"] == (0.9, 0.999) and isinstance(group["betas"], tuple)
    assert float(group["lr"]) == 0.5 and not group["lr"].requires_grad                  # inside a list
    assert isinstance(copied["pair"], tuple) and not copied["pair"][0].requires_grad and copied["pair"][1] == 4
    assert copied["shapes"] == [(1, 2), [3]] and isinstance(copied["shapes"][0], tuple)
    assert {k: copied[k] for k in ("epoch", "sums", "name")} == {"epoch": 3, "sums": {"loss": 1.5, "seen": 64},
                                                                 "name": None}
    save_atomic(obj, tmp_path / "last.pt")
    assert storage_locations(tmp_path / "last.pt") == {"cpu"}
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.ones(3, 2)) and loaded["epoch"] == 3
    assert not loaded["pair"][0].requires_grad          # torch.save keeps requires_grad: on_cpu was applied


def test_training_run_writes_its_log_and_model(reference_run):
    out, result = reference_run
    log = read_log(out)
    assert set(log[0]) >= {"config", "versions", "device"} and log[0]["config"]["hdim"] == 32
    epochs = [r for r in log if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    for r in epochs:
        assert set(r) >= {"epoch", "train_loss", "train_acc", "lr", "epoch_seconds", "images_per_second"}
    assert ["test_acc" in r for r in epochs] == [False, True, True]   # --eval-every 2, and the last
    final = log[-1]
    assert final["final"] and set(final) >= {"test_acc", "test_acc_flip_tta", "wall_seconds", "device"}
    # The result is the model after the last epoch, evaluated again: not the best epoch's.
    assert final["test_acc"] == epochs[-1]["test_acc"] != epochs[1]["test_acc"]
    assert epochs[-1]["lr"] == 0.0 and max(r["lr"] for r in epochs) <= 0.01
    assert f"final test accuracy {final['test_acc']:.2f}%" in result.stdout

    saved = torch.load(out / "model.pt", weights_only=True)
    assert storage_locations(out / "model.pt") == {"cpu"}
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
    final = read_log(out)[-1]
    assert result.stdout.startswith(f"evaluating {out / 'model.pt'}: ")    # first, what it is about to do
    assert f"test accuracy {final['test_acc']:.2f}% (flip-TTA {final['test_acc_flip_tta']:.2f}%)" in result.stdout


def test_same_seed_same_run_with_any_number_of_workers(reference_run, tmp_path):
    run_script(*TINY, "--workers", "2", "--out", tmp_path / "again")
    assert without_timings(read_log(tmp_path / "again")) == without_timings(read_log(reference_run[0]))


def test_fast_batches_resume_mid_chunk_exactly():
    from fast.augment import BatchAugment, device_batches
    import train_cifar
    images, labels = sample_images(80), torch.arange(80) % 10
    plan = train_cifar.EpochPlan(80, 8, seed=1, epoch=2)
    augment = BatchAugment(train_cifar.RANDAUGMENT_OPS, CIFAR10_MEAN, CIFAR10_STD)
    whole = list(device_batches(plan, 0, images, labels, augment, chunk_images=24))  # 3 steps a chunk
    assert len(whole) == 10 and all(x.shape == (8, 3, 32, 32) for x, _ in whole)
    assert [y.tolist() for _, y in whole] == [[plan.order[j] % 10 for j in range(8 * s, 8 * s + 8)]
                                             for s in range(10)]
    for first in (4, 6, 9):                                           # inside and at chunk starts
        resumed = list(device_batches(plan, first, images, labels, augment, chunk_images=24))
        assert len(resumed) == 10 - first
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, whole[first:]))


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_interrupt_then_resume_equals_uninterrupted(path, reference_run, tmp_path):
    flags = [*TINY, "--workers", "0", "--fast" if path == "fast" else "--no-fast"]
    if path == "plain":
        reference = reference_run[0]
    else:
        reference = tmp_path / "uninterrupted"
        run_script(*flags, "--out", reference)
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(HERE / "train_cifar.py"), *flags, "--out", str(out),
                             "--progress-every", "0"],                # a progress line every step
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:                                          # until epoch 2 is under way
        seen.append(line)
        if line.startswith("  epoch 2 step 2/"):
            break
    assert proc.poll() is None, "".join(seen) + proc.stderr.read()
    proc.send_signal(signal.SIGINT)                                  # during epoch 2
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stdout + stderr
    assert "--resume --out" in stderr and "Traceback" not in stderr
    assert not (out / "model.pt").exists()
    stopped = torch.load(out / "last.pt", weights_only=True)
    steps_per_epoch = read_log(reference)[0]["config"]["n_train"] // 128
    assert stopped["epoch"] == 1 and 0 < stopped["step"] < steps_per_epoch     # mid-epoch

    result = run_script("--resume", "--out", out, "--workers", "0", "--eval-every", "2", *DATA)
    log = read_log(out)
    assert any(r.get("resumed") for r in log), "the log must show the resume"
    assert without_timings(log) == without_timings(read_log(reference))
    assert "final test accuracy" in result.stdout
    # The saved tensors themselves: weights, BatchNorm statistics, optimizer state.
    for name in ("model.pt", "last.pt"):
        resumed, uninterrupted = (torch.load(d / name, weights_only=True) for d in (out, reference))
        for key, value in uninterrupted["state_dict"].items():
            assert torch.equal(resumed["state_dict"][key], value), (name, key)
    resumed_opt, reference_opt = (torch.load(d / "last.pt", weights_only=True)["optimizer"]
                                  for d in (out, reference))
    for index, state in reference_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed_opt["state"][index][key], value), (index, key)


def test_val_holds_out_the_last_training_images_and_reports_them(tmp_path):
    result = run_script("--hdim", "16", "--depth", "1", "--psize", "4", "--epochs", "3",
                        "--batch-size", "100", "--fake-data", "1000", "--val", "300", "--eval-every", "2",
                        "--device", "cpu", "--workers", "0", "--out", tmp_path / "o")
    log = read_log(tmp_path / "o")
    assert log[0]["config"]["n_train"] == 700
    epochs = [r for r in log if "train_loss" in r]
    assert [("test_acc" in r, "val_acc" in r) for r in epochs] == [(False, False), (True, True), (True, True)]
    assert "val_acc" in log[-1] and log[-1]["final"]
    assert f"test {epochs[1]['test_acc']:5.2f}%  val {epochs[1]['val_acc']:5.2f}%" in result.stdout


def test_resume_between_the_last_epoch_and_the_final_evaluation_finishes_the_run(reference_run, tmp_path):
    out = tmp_path / "stopped"
    shutil.copytree(reference_run[0], out)
    finished = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    log = read_log(out)
    (out / "model.pt").unlink()                                   # a kill after the last last.pt
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:-1]))
    result = run_script("--resume", "--out", out, "--workers", "0", *DATA)
    assert "all 3 epochs are done" in result.stdout
    assert without_timings(read_log(out)) == without_timings(log)
    again = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(again[k], finished[k]) for k in finished)
    result = run_script("--resume", "--out", out, "--workers", "0", *DATA, check=False)
    assert result.returncode == 1 and "has already finished all its epochs" in result.stderr


def child_pids(pid):
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("signum, to, workers", [(signal.SIGTERM, "the process", 0),
                                                 (signal.SIGTERM, "its group", 2),
                                                 (signal.SIGINT, "its group", 2)])
def test_sigterm_and_ctrl_c_save_and_say_how_to_resume(tmp_path, signum, to, workers):
    """To "its group": every process of the run, data workers included, gets the signal, as from
    `timeout`, a terminal's Ctrl-C, systemd or a batch scheduler. The workers must leave it to the
    main process, which saves the steps done so far, not fail in the middle of a step. It is sent
    as soon as the first worker exists, its first instants being the hardest (it failed 2 times in 8
    while workers were forked with SIGTERM unblocked)."""
    if to == "its group" and not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs Linux's /proc/PID/task/PID/children to see the data workers")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, str(HERE / "train_cifar.py"), "--hdim", "16", "--depth", "1",
                             "--psize", "4", "--epochs", "50", "--batch-size", "50", "--fake-data", "1000",
                             "--device", "cpu", "--workers", str(workers), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() or workers and not child_pids(proc.pid):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    if to == "the process":
        proc.send_signal(signum)
    else:
        os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stdout + stderr
    name = signal.Signals(signum).name
    assert f"{name}: stopped at" in stderr and f"--resume --out {out}" in stderr and "Traceback" not in stderr
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] < 50 and (saved["epoch"], saved["step"]) != (0, 0)   # the steps done are kept
    while time.time() < deadline:                  # and no worker is left behind
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("a data worker outlived the run")


def a_data_worker(ready):
    from trainer.housekeeping import leave_stops_to_the_main_process
    leave_stops_to_the_main_process(0)
    ready.set()
    time.sleep(60)


@pytest.mark.skipif(sys.platform != "linux", reason="elsewhere PyTorch's own handling stays")
def test_a_data_worker_ends_on_a_sigterm_from_its_main_process_only():
    """DataLoader ends a worker that does not stop with SIGTERM (Process.terminate); any other
    sender's SIGTERM is the main process's to handle. The trainer's workers are forked on Linux
    (whatever Python's default), which this needs: a worker started otherwise may have a thread
    that takes the signal before the init function runs."""
    import multiprocessing
    from trainer.housekeeping import data_workers
    if sys.platform == "linux":
        assert data_workers(2)["multiprocessing_context"] == "fork"
    assert data_workers(0) == {"num_workers": 0, "worker_init_fn": None, "multiprocessing_context": None}
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=a_data_worker, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(30)
    subprocess.run([sys.executable, "-c", f"import os; os.kill({worker.pid}, {int(signal.SIGTERM)})"],
                   check=True)                                            # from another process
    worker.join(1)
    assert worker.is_alive()
    worker.terminate()                                                    # from its main process
    worker.join(30)
    assert worker.exitcode == 0


@pytest.mark.parametrize("step_mode", ["host", "device"])
def test_non_finite_loss_stops_with_a_clear_error(tmp_path, step_mode):
    """host: found at once; device: found on the device, read at the epoch's end, the same words."""
    result = run_script("--hdim", "16", "--depth", "1", "--psize", "4", "--epochs", "1",
                        "--batch-size", "100", "--fake-data", "400", "--device", "cpu", "--workers", "0",
                        "--step-mode", step_mode, "--lr", "1e30", "--out", tmp_path / "o", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "loss became nan or inf at epoch 1, step 2" in result.stderr


# ---------------------------------------------------------------------------------------------
# A run survives a kill at any instant, a full disk and damaged files (trainer/files.py). As storage
# systems are tested: kill the process at random instants and inside its writes, resume each time,
# and compare the end with an uninterrupted run's, tensor for tensor.

KILLABLE = ["--hdim", "8", "--depth", "1", "--ksize", "3", "--psize", "4", "--epochs", "3",
            "--batch-size", "40", "--fake-data", "400", "--eval-every", "2", "--device", "cpu",
            "--workers", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def killable_reference(tmp_path_factory):
    """The uninterrupted run, as the killed runs go (last.pt after every step), and how long its start
    (imports, data, model) and its training with the final evaluation took. Not up to the process's
    exit: that took as long again as the training here, and a kill drawn there found the run done."""
    out = tmp_path_factory.mktemp("killable") / "run"
    start = time.time()
    proc = start_or_resume(out)
    watchdog = threading.Timer(300, proc.kill)                     # a hung run ends the reads below
    watchdog.start()
    proc.stdout.readline()                                         # "ConvMixer-8/1 ...": training starts
    started = ended = time.time()
    for line in proc.stdout:
        if line.startswith("final test accuracy"):                # the last line: then only the exit
            ended = time.time()
    stdout, stderr = proc.communicate(timeout=300)
    watchdog.cancel()
    assert proc.returncode == 0 and ended > started, stdout + stderr
    return out, (started - start, ended - started)


def assert_same_run(out, reference):
    """The same log (less timings), final weights, last.pt and optimizer state, bit for bit."""
    assert without_timings(read_log(out)) == without_timings(read_log(reference))
    for name in ("model.pt", "last.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (out, reference))
        assert a.keys() == b.keys(), name
        for key, value in b["state_dict"].items():
            assert torch.equal(a["state_dict"][key], value), (name, key)
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (out, reference))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert {k: v for k, v in a["sums"].items() if k != "seconds"} == \
        {k: v for k, v in b["sums"].items() if k != "seconds"}
    for index, state in b["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(a["optimizer"]["state"][index][key], value), (index, key)
    assert not list(Path(out).glob("*.tmp"))


# Runs train_cifar.main in a process that SIGKILLs itself inside its n-th write of one kind:
# "checkpoint" (half of NAME.tmp written), "rename" (NAME.tmp whole, not yet renamed over NAME),
# "model" (half of model.pt.tmp) or "log" (half a line).
KILL_INSIDE = """
import os, signal, sys
sys.path.insert(0, {here!r})
import train_cifar, trainer.files as files
kind, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def due():
    calls[0] += 1
    return calls[0] == n
def die():
    os.kill(os.getpid(), signal.SIGKILL)
real_write_atomic, real_write_log = files.write_atomic, files.write_log
def write_atomic(data, path):
    tmp = path.with_name(path.name + ".tmp")
    if kind == "checkpoint" and due() or kind == "model" and path.name == "model.pt":
        tmp.write_bytes(data[:len(data) // 2])
        die()
    if kind == "rename" and due():
        tmp.write_bytes(data)
        die()
    real_write_atomic(data, path)
def write_log(path, record):
    if kind == "log" and due():
        line = (files.json.dumps(record) + "\\n").encode()
        with open(path, "ab") as f:
            f.write(line[:len(line) // 2])
        die()
    real_write_log(path, record)
files.write_atomic = write_atomic
files.write_log = train_cifar.write_log = write_log
sys.argv = ["train_cifar.py", *sys.argv[3:]]
train_cifar.main(sys.argv[1:])
"""


def start_or_resume(out, killer=None, new_run=KILLABLE):
    """The command that continues the run in `out` at any point: --resume once its log exists."""
    flags = ["--resume", "--out", out, "--workers", "0", "--device", "cpu"] if (out / "log.jsonl").exists() \
        else [*new_run, "--out", out]
    flags += ["--save-every", "0"]                                       # last.pt after every step
    prefix = [sys.executable, "-c", KILL_INSIDE.format(here=str(HERE)), *map(str, killer)] if killer else \
        [sys.executable, str(HERE / "train_cifar.py")]
    return subprocess.Popen([*prefix, *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(out):
    proc = start_or_resume(out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    return stdout, stderr


def finished(out):
    return (out / "log.jsonl").exists() and bool(read_log(out)[-1].get("final"))


def test_sigkill_at_random_instants_never_loses_the_run(killable_reference, tmp_path):
    """SIGKILL at instants drawn at random over a run that writes last.pt after every step (so many
    kills land inside a save), --resume after each, until the run ends (runs are repeated until 8
    kills have landed): each ends as the uninterrupted run did, exactly.
    CONVMIXER_KILL_SEED=<seed> replays a failure's instants."""
    import random
    reference, (start_seconds, train_seconds) = killable_reference
    seed = int(os.environ.get("CONVMIXER_KILL_SEED", random.randrange(10**6)))
    rng, kills, resumes = random.Random(seed), 0, []
    for run in range(8):
        out = tmp_path / f"run{run}"
        while not finished(out) and kills < 8:
            done, proc = 0.0, start_or_resume(out)
            if (out / "last.pt").exists():
                state = torch.load(out / "last.pt", weights_only=True)
                done = (state["epoch"] * 10 + state["step"]) / 30
            # Every other kill: an instant of this process's life (its start, the training left, the
            # final evaluation); the others in its training, which the 5 s start would otherwise
            # outweigh, so that some resumes are sure to begin mid-epoch.
            if kills % 2:
                for line in proc.stdout:                 # until "ConvMixer-...": training begins
                    if line.startswith("ConvMixer-"):
                        break
                time.sleep(rng.uniform(0, train_seconds * (1 - done)))
            else:
                time.sleep(rng.uniform(0, start_seconds + train_seconds * (1 - done)))
            if proc.poll() is not None:                  # it ended before this kill
                stdout, stderr = proc.communicate()
                assert proc.returncode == 0, (seed, stdout + stderr)
                break
            proc.kill()
            proc.communicate()
            kills += 1
        if not finished(out):
            finish(out)
        assert_same_run(out, reference)
        resumes += [r for r in read_log(out) if r.get("resumed")]
        if kills == 8:
            break
    assert kills == 8 and any(r["step"] > 0 for r in resumes), f"seed {seed}: no resume mid-epoch"


def test_sigkill_inside_each_kind_of_write_resumes_exactly(killable_reference, tmp_path):
    """One run killed inside its writes, one kind after another (each process counts its own
    writes), resumed after each kill: the end is the uninterrupted run's."""
    reference, _ = killable_reference
    out, said = tmp_path / "run", []
    for kind, n, where in [
            ("checkpoint", 1, "halfway through the log's first line (its .tmp)"),
            ("rename", 2, "between writing the first last.pt and renaming it"),
            ("checkpoint", 17, "halfway through a last.pt in epoch 2 (after a restart from the log)"),
            ("log", 2, "halfway through the epoch 2 line"),
            ("model", 0, "halfway through model.pt"),
            ("log", 2, "halfway through the final line"),
            ("rename", 2, "between writing model.pt and renaming it")]:
        proc = start_or_resume(out, killer=[kind, n])
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (where, stdout + stderr)
        said.append(stderr)
    said.append(finish(out)[1])
    assert sum("cut short by a kill or a full disk; dropped" in text for text in said) == 2   # once each
    assert_same_run(out, reference)


def test_gpu_check_main_continues_a_run_committed_under_results(killable_reference, tmp_path):
    """tools/gpu_check.sh's main step, on the CPU: a run stopped mid-epoch and committed under
    results/ is continued in the output folder, its console kept in the run's folder, and a run
    that is complete is recognised as such."""
    reference, _ = killable_reference
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("train_cifar.py", "convmixer.py", "trainer", "fast", "tools"):
        (shutil.copytree if (HERE / name).is_dir() else shutil.copy)(HERE / name, checkout / name)
    committed = checkout / "results" / "tiny"
    start_or_resume(committed, killer=["rename", 15]).communicate(timeout=300)   # killed in epoch 2
    (committed / "last.pt.tmp").unlink()                          # git ignores *.tmp
    stopped = torch.load(committed / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (1, 1)
    env = {**os.environ, "RUN_NAME": "tiny", "MAIN_FLAGS": "--device cpu --workers 0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def gpu_check(out):
        return subprocess.run(["bash", "tools/gpu_check.sh", str(out), "main"], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=300)
    result = gpu_check(tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "out" / "tiny"
    assert f"main: continuing results/tiny in {run}" in result.stdout
    assert "3 epochs, complete; 2 pieces" in result.stdout and "| 2 | epoch 2, step 1 | end of epoch 3 |" \
        in result.stdout
    console = (run / "console.txt").read_text()
    assert console.startswith(f"resuming {run} at epoch 2, step 1") and "final test accuracy" in console
    assert console.splitlines()[-1].startswith("main: train_cifar.py exited with status 0, ")
    assert not (run / "last.pt").exists() and (run / "model.pt").exists()
    assert without_timings(read_log(run)) == without_timings(read_log(reference))
    a, b = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (run, reference))
    assert all(torch.equal(a[k], v) for k, v in b.items())
    again = gpu_check(tmp_path / "out")
    assert again.returncode == 0 and f"main: {run} is complete" in again.stdout


def test_gpu_check_tests_select_the_training_paths_gpu_tests_and_all_adds_the_rest():
    """tools/gpu_check.sh's two pytest -k selections, collected here: the default one must hold
    every CUDA-only test (but torch.compile's model in a CUDA graph, not on the training path), the
    kernels at the main job's shapes (a typo there would cost a GPU its test step) and the fused
    GELU -> BatchNorm's tests (but torch.compile's), and no float32 kernel test of another shape,
    which GPU_TESTS=all adds."""
    import re
    default, everything = re.findall(r'selection="([^"]+)"', (HERE / "tools" / "gpu_check.sh").read_text())

    def collected(expression):
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 "-k", expression, "test_convmixer.py"], cwd=HERE, capture_output=True,
                                text=True, timeout=300)
        return {line.split("::", 1)[1] for line in result.stdout.splitlines() if line.startswith("test_convmixer.py::")}
    chosen, all_of_them = collected(default), collected(everything)
    cuda_only = set(re.findall(r"^def (test_\w*cuda_only\w*)\(", (HERE / "test_convmixer.py").read_text(), re.M))
    cuda_only_tests = {t for t in all_of_them if t.split("[")[0] in cuda_only}     # with parameters
    assert len(cuda_only) >= 5 and {t.split("[")[0] for t in cuda_only_tests} == cuda_only
    assert cuda_only_tests - chosen == {"test_device_step_cuda_only_graph_replays_what_the_eager_step_does"
                                        "[torch_compile]"}, cuda_only_tests - chosen
    assert {f"test_fast_depthwise_matches_conv2d_bfloat16_autocast[{b}-{k}-{a}]" for b, k in [(1, 9), (64, 8), (512, 9)]
            for a in ("direct", "toeplitz")} <= chosen
    assert {"test_fast_depthwise_matches_conv2d_float32[direct-2-3-32-32-9]",
            "test_fast_depthwise_matches_conv2d_float32[toeplitz-2-3-32-32-9]",
            "test_fast_depthwise_toeplitz_stacks_16_bit_planes_including_partial_stacks[17]",
            "test_fast_depthwise_bfloat16_partial_stacks_and_bias_gradient[17]",
            "test_batch_augment_on_cuda_matches_the_cpu_for_the_same_parameters"} <= chosen
    fused_norm = {t for t in all_of_them if t.startswith("test_fused_gelu_batchnorm_")}   # --fused-norm's kernels
    assert len(fused_norm) >= 12 and fused_norm - chosen == {"test_fused_gelu_batchnorm_compiles_into_one_graph"}
    assert not {t for t in chosen if t.startswith("test_benchmark")}          # CPU runs of a subprocess
    float32 = {t for t in all_of_them if t.startswith("test_fast_depthwise_matches_conv2d_float32[")}
    assert len(float32) == 22 and chosen & float32 == {t for t in float32 if "-32-32-9]" in t}
    assert chosen < all_of_them


def gpu_check_calls(tmp_path, step, **env):
    """The python commands tools/gpu_check.sh runs for `step`, recorded by a stand-in `python`."""
    stand_in = tmp_path / "bin" / "python"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text('#!/bin/sh\nprintf "%s|" "$@" >> "$CALLS"; echo >> "$CALLS"\n')
    stand_in.chmod(0o755)
    env = dict(os.environ, PATH=f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}",
               CALLS=str(tmp_path / "calls"), **env)
    result = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "out"), step], cwd=HERE, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.rstrip("|").split("|") for line in (tmp_path / "calls").read_text().splitlines()
            if not line.startswith("-c|")]                               # not its version line


def test_gpu_check_bench_runs_the_benchmark_eager_fused_then_compiled(tmp_path):
    """Three benchmark runs of the main job's model at batch 64 and 512, each into its own folder,
    torch.compile's last; BENCH_RUNS picks some of them, and a name that is none of them stops the
    script before it runs anything."""
    model = ["fast/benchmark.py", "--hdim", "256", "--depth", "8", "--ksize", "9", "--batch-sizes", "64", "512"]
    eager, fused, compiled = [], ["--fused-norm", "--paths", "fast", "fast_graph"], ["--compile"]

    def calls(folder, runs):
        return [model + flags + ["--out", f"{tmp_path}/{folder}/out/{name}"] for name, flags in runs]
    assert gpu_check_calls(tmp_path / "all", "bench") == calls(
        "all", [("bench", eager), ("bench_fused_norm", fused), ("bench_compile", compiled)])
    assert gpu_check_calls(tmp_path / "two", "bench", BENCH_RUNS="bench_compile bench_fused_norm") == calls(
        "two", [("bench_fused_norm", fused), ("bench_compile", compiled)])
    typo = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "typo"), "tests", "bench"], cwd=HERE,
                          env=dict(os.environ, BENCH_RUNS="bench_fusednorm"), capture_output=True, text=True)
    assert typo.returncode == 2 and not (tmp_path / "typo").exists()
    assert "BENCH_RUNS: no run named bench_fusednorm (bench bench_fused_norm bench_compile)" in typo.stdout


def test_gpu_check_short_run_takes_its_flags_and_folder(tmp_path):
    calls = gpu_check_calls(tmp_path, "short", SHORT_FLAGS="--fused-norm --step-mode host",
                            SHORT_NAME="short_fused_norm")
    assert calls == [["train_cifar.py", "--hdim", "256", "--depth", "8", "--ksize", "5", "--psize", "2",
                      "--epochs", "25", "--batch-size", "512", "--fast", "--fused-norm", "--step-mode", "host",
                      "--data", "data", "--out", f"{tmp_path}/out/short_fused_norm"]]


MAIN_RUN = HERE / "results" / "cifar10_convmixer_256_8_k9_p1"


def test_the_committed_main_run_is_the_main_job_complete_and_its_model_scores_as_logged():
    """The 200-epoch run under results/, the README's headline: its recipe is the main command's
    defaults (how a step ran aside), its log holds every epoch and the final record, last.pt is gone
    (nothing is left to continue), and with the real test set the published weights
    (convmixer_cifar10(pretrained=True), in the readable CPU model: float32, nn.Conv2d) score on 500
    test images about what the log says the run scored on all 10,000 (bfloat16, Triton kernels)."""
    import train_cifar
    from trainer.files import CHANGEABLE_ON_RESUME
    log = read_log(MAIN_RUN)
    defaults = train_cifar.parse_args([])
    same = [k for k in train_cifar.RECIPE_KEYS if k not in CHANGEABLE_ON_RESUME | {"fast"}]
    recipe = log[0]["config"]
    assert {k: recipe.get(k) for k in same} == {k: getattr(defaults, k) for k in same} and recipe["fast"]
    assert (defaults.hdim, defaults.depth, defaults.ksize, defaults.psize) == (256, 8, 9, 1)
    epochs = [r for r in log if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == list(range(1, recipe["epochs"] + 1)) == list(range(1, 201))
    starts = [(r["epoch"], r["step"]) for r in log if r.get("resumed")]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)         # each piece went on
    final = log[-1]
    assert final.get("final") and final["test_acc"] == epochs[-1]["test_acc"]
    assert not (MAIN_RUN / "last.pt").exists()
    saved = torch.load(MAIN_RUN / "model.pt", weights_only=True)
    assert {k: saved["config"][k] for k in ("hdim", "depth", "ksize", "psize")} == \
        {k: recipe[k] for k in ("hdim", "depth", "ksize", "psize")}
    if REAL_DATA:
        images, labels = train_cifar.load_cifar10(REAL_DATA, train=False)
        model = convmixer.convmixer_cifar10(pretrained=True)
        accuracy, = train_cifar.evaluate(model, images[:500], labels[:500], torch.device("cpu"), amp=False)
        assert abs(accuracy - final["test_acc"]) < 4, (accuracy, final["test_acc"])   # 500 images: +-1% s.d.


def test_plot_run_draws_the_committed_runs_and_one_in_progress(tmp_path):
    runs = sorted(str(d) for d in (HERE / "results").glob("cifar10_256_8_k5_p2_*"))
    assert len(runs) == 3
    in_progress = tmp_path / "in_progress"
    in_progress.mkdir()
    lines = (HERE / "results" / "cifar10_256_8_k5_p2_plain_seed0" / "log.jsonl").read_text().splitlines()
    (in_progress / "log.jsonl").write_text("\n".join(lines[:13]) + "\n" + lines[13][:30])  # 12 epochs, torn
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, str(HERE / "tools" / "plot_run.py"), *runs, str(in_progress),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert "cut short" in result.stderr
    result = subprocess.run([sys.executable, str(HERE / "tools" / "plot_run.py"), str(tmp_path),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "no log.jsonl there" in result.stderr


def test_a_run_with_the_device_step_resumes_exactly(tmp_path):
    """--step-mode device keeps the epoch's sums on the device: killed mid-epoch between two saves
    (and its sums read back before each), resumed, it ends as its uninterrupted twin did."""
    device_run = [*KILLABLE, "--step-mode", "device"]
    run_script(*device_run, "--out", tmp_path / "reference")
    out = tmp_path / "run"
    start_or_resume(out, killer=["rename", 15], new_run=device_run).communicate(timeout=300)
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (1, 1) and stopped["recipe"]["step_mode"] == "device"
    finish(out)
    assert_same_run(out, tmp_path / "reference")


def test_resume_takes_a_new_step_mode_and_refuses_any_other_change_of_recipe(killable_reference, tmp_path,
                                                                           capsys):
    """The step mode says how a step runs, not what it computes, so that a long run can take a mode
    once it is tested; any other recipe flag given to --resume must be the run's own (the original
    command's flags are), since a resumed run keeps its recipe: ignoring the flag would be silent.
    tools/run_pieces.py then tells the pieces apart."""
    out = tmp_path / "run"
    start_or_resume(out, killer=["rename", 15]).communicate(timeout=300)
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (1, 1) and stopped["recipe"]["step_mode"] == "host"
    log_before = (out / "log.jsonl").read_bytes()
    for change, words in [(["--epochs", "5"], "--epochs is given as 5 and the run has 3"),
                          (["--seed", "4"], "--seed is given as 4 and the run has 3"),
                          (["--no-amp"], "--amp is given as False and the run has True"),
                          (["--fast"], "--fast is given as True and the run has False")]:
        lines = error_lines_of_main(["--resume", "--out", out, "--device", "cpu", *change], capsys)
        assert words in lines[-1] and "start a new run in another --out" in lines[-1], (change, lines)
    assert (out / "log.jsonl").read_bytes() == log_before

    import train_cifar, trainer.files as files
    for flags, taken in [([], {"step_mode": "host", "compile": False, "fused_norm": False}),
                         (["--compile", "--step-mode", "device"], {"step_mode": "device", "compile": True}),
                         (["--fused-norm"], {"fused_norm": True})]:
        args = train_cifar.parse_args(["--resume", "--out", str(out), "--device", "cpu", *flags])
        recipe = files.read_resume_state(out, train_cifar.RECIPE_KEYS, args)["recipe"]
        assert recipe == {**stopped["recipe"], **taken}

    graph = tmp_path / "graph"                          # a run of CUDA graphs, continued on a CPU
    shutil.copytree(out, graph)
    torch.save({**stopped, "recipe": {**stopped["recipe"], "step_mode": "graph"}}, graph / "last.pt")
    lines = error_lines_of_main(["--resume", "--out", graph, "--device", "cpu"], capsys)
    assert "needs a CUDA device" in lines[-1] and "--resume --step-mode device" in lines[-1]

    result = run_script("--resume", "--out", out, *KILLABLE, "--step-mode", "device")
    assert "resuming with --step-mode device (it was host)" in result.stdout
    resumes = [r for r in read_log(out) if r.get("resumed")]
    assert [(r["epoch"], r["step"], r["step_mode"]) for r in resumes] == [(2, 1, "device")]
    assert torch.load(out / "last.pt", weights_only=True)["recipe"]["step_mode"] == "device"
    # tools/run_pieces.py: the table of the run's pieces, for the run in progress and the finished one.
    spec = importlib.util.spec_from_file_location("run_pieces", HERE / "tools" / "run_pieces.py")
    run_pieces = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_pieces)
    with pytest.raises(Exception, match="no log.jsonl there; give the folder of a train_cifar.py run"):
        run_pieces.pieces(tmp_path)
    summary, rows = run_pieces.pieces(graph)
    assert "3 epochs, in progress; 1 piece," in summary
    assert [(r["from"], r["to"], r["step mode"]) for r in rows] == [("epoch 1, step 0", "epoch 2, step 1", "host")]
    summary, rows = run_pieces.pieces(out)
    assert [(r["from"], r["to"], r["step mode"]) for r in rows] == [
        ("epoch 1, step 0", "epoch 2, step 1", "host"), ("epoch 2, step 1", "end of epoch 3", "device")]
    total = read_log(out)[-1]["wall_seconds"]
    assert f"complete; 2 pieces, {run_pieces.format_seconds(total)} of training in all" in summary
    assert resumes[0]["wall_seconds_before"] == stopped["wall_seconds"] < total
    assert {r["torch"] for r in rows} == {torch.__version__} and all(r["time"] != "?" for r in rows)
    commit = read_log(out)[0]["code"]
    assert rows[0]["commit"] == (commit["commit"][:7] + " + changes" * bool(commit["dirty"])
                                 + " (named)" * bool(commit.get("from")) if commit else "unknown")
    assert run_pieces.markdown(rows).splitlines()[0] == \
        "| piece | from | to | time | img/s | device | commit | step mode | torch |"
    config = read_log(out)[0]["config"]           # img/s: the piece's images per second of its time
    b, steps_per_epoch = config["batch_size"], config["n_train"] // config["batch_size"]
    before = resumes[0]["wall_seconds_before"]
    assert [r["img/s"] for r in rows] == [f"{(steps_per_epoch + 1) * b / before:,.0f}",
                                          f"{(2 * steps_per_epoch - 1) * b / (total - before):,.0f}"]
    assert run_pieces.pieces(graph)[1][0]["img/s"] == f"{(steps_per_epoch + 1) * b / stopped['wall_seconds']:,.0f}"

    # The same update: on CUDA every mode runs the same fused AdamW kernel; on a CPU the host mode's
    # AdamW is not fused, so the switched run ends as the host run did up to float rounding.
    switched, reference = (without_timings(read_log(d)) for d in (out, killable_reference[0]))
    losses = [[r.pop("train_loss", None) for r in log] for log in (switched, reference)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert switched == reference
    a, b = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (out, killable_reference[0]))
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6) for k in b)


def test_a_torn_last_log_line_is_dropped_on_resume(reference_run, tmp_path):
    """The case a full disk leaves: log.jsonl ends in half a line; last.pt is intact."""
    out = tmp_path / "torn"
    shutil.copytree(reference_run[0], out)
    lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "model.pt").unlink()
    (out / "log.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])   # the final line, torn
    result = run_script("--resume", "--out", out, "--workers", "0", *DATA)
    assert [line for line in result.stderr.splitlines() if "cut short" in line] == \
        [f"{out / 'log.jsonl'}: its last line (40 bytes) was cut short by a kill or a full disk; dropped"]
    assert without_timings(read_log(out)) == without_timings(read_log(reference_run[0]))
    finished, again = (torch.load(d / "model.pt", weights_only=True)["state_dict"]
                       for d in (reference_run[0], out))
    assert all(torch.equal(again[k], v) for k, v in finished.items())


def test_damaged_files_get_one_line_each(killable_reference, tmp_path, capsys, keep_signal_handlers):
    """Run in this process (train_cifar.main), to spare a start per case."""
    import train_cifar
    reference, _ = killable_reference
    cases = []

    def damaged(name, damage):
        out = tmp_path / name
        shutil.copytree(reference, out)
        (out / "model.pt").unlink()                                  # not finished: resumable
        log = read_log(out)
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:-1]))
        damage(out)
        return out

    truncated = damaged("truncated",
                        lambda o: (o / "last.pt").write_bytes((o / "last.pt").read_bytes()[:3000]))
    cases.append((["--resume", "--out", truncated], f"--resume {truncated / 'last.pt'}: cannot read it"))
    model_as_last = damaged("model_as_last", lambda o: shutil.copy(reference / "model.pt", o / "last.pt"))
    cases.append((["--resume", "--out", model_as_last], "a model file, not a run's last.pt"))
    foreign = damaged("foreign", lambda o: torch.save({"weights": torch.zeros(3)}, o / "last.pt"))
    cases.append((["--resume", "--out", foreign], "not a checkpoint written by train_cifar.py"))
    middle = damaged("middle", lambda o: (o / "log.jsonl").write_text(
        (o / "log.jsonl").read_text().replace('{"epoch": 1,', '{"epoch": 1', 1)))
    cases.append((["--resume", "--out", middle], f"{middle / 'log.jsonl'}, line 2: damaged"))
    gone = damaged("gone", lambda o: (o / "last.pt").unlink())
    cases.append((["--resume", "--out", gone], "training had begun; there is no state to continue from"))
    cut_model = tmp_path / "cut_model.pt"
    cut_model.write_bytes((reference / "model.pt").read_bytes()[:2000])
    cases.append((["--eval", cut_model, "--fake-data", "100"], f"--eval {cut_model}: cannot read it"))
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            train_cifar.main([*map(str, argv), "--device", "cpu", "--workers", "0"])
        error = str(e.value.code)
        assert error.startswith("train_cifar.py: error: ") and "\n" not in error and expected in error, argv
        assert not capsys.readouterr().err, argv                       # that line and nothing else

    stray = damaged("stray_tmp", lambda o: (o / "last.pt.tmp").write_bytes(b"half a checkpoint"))
    train_cifar.main(["--resume", "--out", str(stray), "--workers", "0", "--device", "cpu"])
    assert_same_run(stray, reference)
    # A kill before anything was written leaves at most a .tmp: the first command works again.
    early = tmp_path / "early"
    early.mkdir()
    (early / "log.jsonl.tmp").write_text('{"config": {"hd')
    train_cifar.main([*KILLABLE, "--out", str(early)])
    assert_same_run(early, reference)


class FullDisk:
    """Makes the n-th write of one kind fail as a full disk does: part of the bytes are written,
    then OSError(ENOSPC). kind: "checkpoint" (write_atomic's file) or "log" (a log line)."""

    def __init__(self, monkeypatch, kind, n):
        import builtins
        import types
        import trainer.files as files
        self.calls, real_open, real_os = 0, builtins.open, files.os

        def fail_now():
            self.calls += 1
            return self.calls == n

        class FillingFile:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                if fail_now():
                    self.f.write(data[:len(data) // 3])
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        def limited_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return FillingFile(f) if kind == "checkpoint" and "w" in mode else f

        def limited_write(fd, data):
            if fail_now():
                real_os.write(fd, bytes(data[:len(data) // 3]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_os.write(fd, data)

        monkeypatch.setattr(files, "open", limited_open, raising=False)
        if kind == "log":
            monkeypatch.setattr(files, "os",
                                types.SimpleNamespace(**{**vars(real_os), "write": limited_write}))


@pytest.mark.parametrize("kind,n", [("checkpoint", 7), ("log", 2)])
def test_a_full_disk_stops_the_run_in_one_line_and_resume_continues_it(
        kind, n, killable_reference, tmp_path, monkeypatch, keep_signal_handlers):
    import train_cifar
    reference, _ = killable_reference
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        FullDisk(patch, kind, n)
        with pytest.raises(train_cifar.Fail) as e:
            train_cifar.train(train_cifar.parse_args([*KILLABLE, "--out", str(out), "--save-every", "0"]))
    message = str(e.value)
    assert "\n" not in message and "the disk is full" in message, message
    assert f"Free some space, then continue with: python train_cifar.py --resume --out {out}" in message
    saved = torch.load(out / "last.pt", weights_only=True)                    # intact
    assert f"last.pt holds epoch {saved['epoch'] + 1}, step {saved['step']}" in message
    assert not list(out.glob("*.tmp")) and read_log(out)                      # whole lines only
    train_cifar.main(["--resume", "--out", str(out), "--workers", "0", "--device", "cpu"])
    assert_same_run(out, reference)


def test_a_real_full_disk_stops_the_run_and_resume_continues_once_there_is_room(killable_reference, tmp_path):
    """The same on a real filesystem: a 48 KiB tmpfs (needs the right to mount one, as root has)
    holds the log and one last.pt but not a second beside it; after the error it is made larger."""
    reference, _ = killable_reference
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        out = disk / "run"
        result = run_script(*KILLABLE, "--out", out, "--save-every", "0", check=False)
        error = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(error) == 1 and "the disk is full" in error[0], result.stderr
        saved = torch.load(out / "last.pt", weights_only=True)
        assert f"last.pt holds epoch {saved['epoch'] + 1}, step {saved['step']}" in error[0]
        assert not list(out.glob("*.tmp")) and read_log(out)
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        run_script(*error[0].split("continue with: python train_cifar.py ")[1].split(), "--workers", "0",
                   "--device", "cpu")
        assert_same_run(out, reference)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_the_log_records_the_commit_at_each_start_and_resume(killable_reference, tmp_path,
                                                             keep_signal_handlers):
    import train_cifar
    reference, _ = killable_reference
    head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "model.pt").unlink()
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_log(out)[:-1]))
    train_cifar.main(["--resume", "--out", str(out), "--workers", "0", "--device", "cpu"])
    starts = [r for r in read_log(out) if "config" in r or r.get("resumed")]
    assert len(starts) == 2
    for record in starts:
        assert record["code"]["commit"] == head.stdout.strip() and isinstance(record["code"]["dirty"], bool)
        assert record["device"].startswith("cpu") and record["versions"]["torch"] == torch.__version__
        assert "triton" not in record["versions"]                  # recorded on CUDA only


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_is_dirty_for_changed_code_not_for_changed_results(tmp_path):
    from trainer.files import code_version
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t",  # noqa: E731
                                        "-c", "user.email=t@t", *args], check=True, capture_output=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "trainer").mkdir()
    for name in ["train_cifar.py", "trainer/files.py", "results/log.jsonl", "README.md"]:
        (tmp_path / name).write_text("x\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert code_version(tmp_path) == {"commit": head.stdout.strip(), "dirty": False}
    for name in ["results/log.jsonl", "README.md"]:      # a run's committed files go on; no code changed
        (tmp_path / name).write_text("y\n")
    (tmp_path / "notes.py").write_text("untracked\n")
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "trainer/files.py").write_text("y\n")
    assert code_version(tmp_path)["dirty"] is True
    git("commit", "-qam", "d")
    (tmp_path / "train_cifar.py").unlink()
    assert code_version(tmp_path)["dirty"] is True


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
    (["--workers", "-1"], "--workers"), (["--eval-every", "-1"], "--eval-every"),
    (["--ra-m", "11"], "--ra-m"), (["--ra-p", "1.5"], "--ra-p"), (["--ra-mstd", "-1"], "--ra-mstd"),
    (["--psize", "64"], "--psize"), (["--progress-every", "-1"], "--progress-every"),
    (["--seed", "99999999999999999999"], "--seed"), (["--lr", "inf"], "--lr"), (["--wd", "nan"], "--wd"),
    (["--hdim", "100000"], "--hdim"), (["--workers", "1000"], "--workers"),
    (["--psize", "4", "--ksize", "16"], "--ksize"),
    (["--device", "nonsense"], "--device"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--resume"], "--resume"),
])
def test_bad_flags_fail_at_start_naming_the_flag(argv, expected, capsys):
    import train_cifar
    with pytest.raises(SystemExit) as e:
        train_cifar.parse_args(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]          # not the usage text above it
    assert e.value.code == 2 and error.startswith("train_cifar.py: error: ") and expected in error, error


def test_a_device_that_is_not_here_is_one_line_naming_it(monkeypatch, capsys):
    """Before any data is read: an accelerator this machine lacks, or a GPU index beyond its GPUs."""
    import train_cifar
    if not torch.backends.mps.is_available():
        with pytest.raises(SystemExit):
            train_cifar.parse_args(["--device", "mps"])
        assert "error: --device mps: MPS is not available here" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert train_cifar.parse_args(["--device", "cuda:0"]).fast is True
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--device", "cuda:1"])
    assert "error: --device cuda:1: there is no cuda device 1 here (1 in all, numbered from 0)" in \
        capsys.readouterr().err


def test_every_train_cifar_flag_that_the_project_mentions_exists(capsys):
    """README, notebook, docstrings and tools name train_cifar.py's flags; a renamed or removed
    flag must not live on in them (--benchmark, moved to fast/benchmark.py, once did)."""
    import re
    import train_cifar
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--help"])
    known = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out))
    assert {"--hdim", "--resume", "--save-every", "--no-fast", "--step-mode"} <= known
    cells = json.loads((HERE / "tutorial.ipynb").read_text())["cells"]
    texts = {"tutorial.ipynb": "\n".join("".join(c["source"]) for c in cells),
             "README.md": (HERE / "README.md").read_text()}
    for folder, pattern in [(".", "*.py"), ("trainer", "*.py"), ("fast", "*.py"), ("tools", "*")]:
        texts.update({str(f.relative_to(HERE)): f.read_text() for f in sorted((HERE / folder).glob(pattern))
                      if f.is_file()})
    unknown = [(name, flag, line.strip()) for name, text in texts.items() for line in text.splitlines()
               if "train_cifar.py" in line
               for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line[line.index("train_cifar.py"):])
               if flag not in known]
    assert not unknown, unknown


def test_every_flag_with_a_bad_value_fails_in_one_line_naming_it(capsys):
    """A sweep: each numeric flag with values a user might type by mistake either works or is
    refused at start with one line that names it."""
    import argparse
    import train_cifar
    parser_flags = []
    original = argparse.ArgumentParser.parse_args

    def capture(parser, args=None, namespace=None):
        parser_flags.extend(a.option_strings[0] for a in parser._actions
                            if a.option_strings and a.type in (int, float))
        return original(parser, args, namespace)
    argparse.ArgumentParser.parse_args = capture
    try:
        train_cifar.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    assert len(parser_flags) > 25
    refused = 0
    for flag in parser_flags:
        for value in ["abc", "nan", "inf", "-1", "-1e9", "1e30", "99999999999999999999"]:
            try:
                train_cifar.parse_args([flag, value])
            except SystemExit as e:
                error = capsys.readouterr().err.strip().splitlines()
                assert e.code == 2 and len(error) == 1 and flag in error[0], (flag, value, error)
                refused += 1
    assert refused > 150


def test_existing_out_and_bad_checkpoints_fail_naming_the_file(reference_run, tmp_path, capsys):
    out, _ = reference_run
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    mismatched = tmp_path / "mismatched.pt"
    saved = torch.load(out / "model.pt", weights_only=True)
    torch.save({**saved, "config": {**saved["config"], "hdim": 48}}, mismatched)
    older = tmp_path / "older"                      # a run whose recipe lacks a newer key
    shutil.copytree(out, older)
    state = torch.load(older / "last.pt", weights_only=True)
    del state["recipe"]["ra_p"]
    torch.save(state, older / "last.pt")
    before_step_mode = tmp_path / "before_step_mode"      # a key added later: the value it ran with
    shutil.copytree(out, before_step_mode)
    (before_step_mode / "model.pt").unlink()
    (before_step_mode / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_log(out)[:-1]))
    state = torch.load(before_step_mode / "last.pt", weights_only=True)
    del state["recipe"]["step_mode"]
    torch.save(state, before_step_mode / "last.pt")
    run_script("--resume", "--out", before_step_mode, "--device", "cpu", "--workers", "0", *DATA)
    cases = [
        (["--resume", "--out", older], "lacks ra_p"),
        (["--out", out], f"--out {out}"),
        (["--resume", "--out", tmp_path / "none"], "log.jsonl does not exist"),
        (["--eval", tmp_path / "missing.pt"], "missing.pt"),
        (["--eval", garbage], "garbage.pt"),
        (["--eval", mismatched, "--fake-data", "10"], "mismatched.pt"),
    ]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    corrupt = tmp_path / "corrupt"
    if REAL_DATA:                                   # a truncated batch file
        shutil.copytree(Path(REAL_DATA) / "cifar-10-batches-py", corrupt / "cifar-10-batches-py")
        batch = corrupt / "cifar-10-batches-py" / "data_batch_3"
        batch.write_bytes(batch.read_bytes()[:1000])
        cases.append((["--data", corrupt, "--epochs", "1", "--out", tmp_path / "c"], "data_batch_3 fails"))
    cases += [
        (["--out", a_file, "--fake-data", "200"], "is a file"),
        (["--data", a_file, "--epochs", "1", "--out", tmp_path / "d"], f"--data {a_file}"),
        (["--out", "/proc/convmixer-run", "--fake-data", "200", "--batch-size", "50", "--workers", "0"],
         "--out /proc/convmixer-run: cannot write there"),                    # not writable, even by root
        (["--out", a_file / "run", "--fake-data", "200", "--batch-size", "50", "--workers", "0"],
         f"--out {a_file / 'run'}: cannot write there"),
    ]
    for argv, expected in cases:          # in this process: a start of Python and torch each is 5 s
        error = error_lines_of_main([*argv, "--device", "cpu"], capsys)
        assert len(error) == 1 and error[0].startswith("train_cifar.py: error: "), (argv, error)
        assert expected in error[0], (argv, error)
    assert not any((tmp_path / name).exists() for name in ("none", "c", "d"))
    result = run_script("--eval", garbage, check=False)             # and one as a user sees it
    error = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(error) == 1, result.stderr
    assert error[0].startswith(f"train_cifar.py: error: --eval {garbage}: cannot read it as a checkpoint")


def error_lines_of_main(argv, capsys):
    """The stderr lines with which train_cifar.main(argv) exits, run in this process. Anything but
    a SystemExit (a traceback, for a user) fails the test; signal handlers are put back."""
    import train_cifar
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            train_cifar.main([str(a) for a in argv])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert e.value.code not in (0, None), argv
    message = e.value.code if isinstance(e.value.code, str) else ""   # sys.exit(text) prints text
    return (capsys.readouterr().err + message).strip().splitlines()


def test_progress_lines_and_an_early_estimate_of_the_whole_run_in_a_log_file(tmp_path):
    result = run_script("--hdim", "16", "--depth", "1", "--psize", "4", "--epochs", "2",
                        "--batch-size", "50", "--fake-data", "500", "--device", "cpu", "--workers", "0",
                        "--progress-every", "0", "--out", tmp_path / "o")
    lines = result.stdout.splitlines()                  # stdout is a pipe here, not a terminal
    steps = [line for line in lines if line.startswith("  epoch ")]
    assert len(steps) == 2 * 10 and all("img/s  ETA " in line for line in steps)
    assert "\r" not in result.stdout
    assert sum(line.startswith("estimate: at ") for line in lines) == 1
    assert "the whole run of 20 steps takes about" in result.stdout


def test_a_cpu_run_that_would_take_days_says_so_and_points_to_the_quick_check(monkeypatch, capsys):
    import argparse
    import time
    import train_cifar
    clock = iter([1000.0, 1010.0])                      # the first step takes 10 s
    monkeypatch.setattr(time, "time", lambda: next(clock, 1010.0))
    recipe = argparse.Namespace(n_train=50_000, batch_size=64, epochs=200)
    progress = train_cifar.Progress(recipe, 0, every=5, device=torch.device("cpu"))
    progress.step(0, 1, 2.3)
    out = capsys.readouterr().out
    assert "156,200 steps takes about 18d01h" in out and "--epochs 2 --subset 2000" in out
    # The suggested flags are train_cifar.py's, and they do make a small, short run.
    quick = train_cifar.parse_args(out[out.index("--hdim"):].split(" checks ")[0].split() + ["--device", "cpu"])
    assert (quick.hdim, quick.depth, quick.psize, quick.epochs, quick.n_train) == (32, 2, 2, 2, 2000)


def test_train_cifar_reads_top_to_bottom_in_at_most_500_lines():
    """The trainer stays a script to read: the housekeeping and the RandAugment table live in
    trainer/, the speed code and the benchmark in fast/."""
    import ast
    source = (HERE / "train_cifar.py").read_text()
    assert len(source.splitlines()) <= 500
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
    too_long = [f.name for f in functions if f.end_lineno - f.lineno + 1 > 60 and f.name != "parse_args"]
    assert not too_long
    assert "profiler" not in source and "def benchmark" not in source


def test_the_cuda_only_lines_run_on_a_cpu_bfloat16_autocast_and_fused_adamw():
    """What a first GPU run would otherwise be the first to execute."""
    import train_cifar
    recipe = train_cifar.parse_args(["--hdim", "16", "--depth", "1", "--psize", "4", "--device", "cpu"])
    results = {}
    for amp, fused in [(False, False), (True, True)]:
        torch.manual_seed(0)
        model = ConvMixer(16, 1, 9, 4, n_classes=10)
        optimizer = train_cifar.make_optimizer(model, recipe, fused=fused)
        assert bool(optimizer.defaults["fused"]) == fused
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        x, targets = torch.randn(8, 3, 32, 32), nn.functional.one_hot(torch.arange(8) % 10, 10).float()
        loss, correct = train_cifar.train_step(model, optimizer, criterion, x, targets, 0.01, amp, 1.0)
        accuracies = train_cifar.evaluate(model, torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8),
                                          torch.arange(16) % 10, torch.device("cpu"), amp, flip_tta=True)
        assert len(accuracies) == 2 and all(0 <= a <= 100 for a in accuracies) and 0 <= correct <= 8
        results[amp] = (loss, [p.detach().clone() for p in model.parameters()])
    assert results[True][0] == pytest.approx(results[False][0], rel=0.05)     # bfloat16: ~3 digits
    for p_amp, p_fp32 in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(p_amp, p_fp32, rtol=0.05, atol=2e-3)
    assert train_cifar.make_optimizer(model, recipe).defaults["fused"] is None   # CPU default


def device_step_setup(fused_optimizer=True, seed=0):
    import train_cifar
    recipe = train_cifar.parse_args(["--hdim", "16", "--depth", "1", "--psize", "4", "--device", "cpu"])
    torch.manual_seed(seed)
    model = ConvMixer(16, 1, 9, 4, n_classes=10)
    optimizer = train_cifar.make_optimizer(model, recipe, fused=fused_optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=g),
                nn.functional.one_hot(torch.randperm(10, generator=g)[:8], 10).float()) for _ in range(6)]
    return model, optimizer, criterion, batches


def test_device_step_equals_the_host_step_and_skips_a_non_finite_loss_on_the_device():
    """fast/step.py's DeviceStep against train_step (both with the fused AdamW it needs): the same
    weights, optimizer state and running sums, bit for bit, with a gradient clipping that acts at
    every step; then non-finite losses, which leave the weights as they were, for those steps and
    the ones after them, and the first of which is reported by its step count."""
    import train_cifar
    from fast.step import DeviceStep
    clip = 0.5                      # these gradients' norms are 0.67-0.71: clipped at every step
    host_model, host_optimizer, criterion, batches = device_step_setup()
    model, optimizer, _, _ = device_step_setup()
    step = DeviceStep(model, optimizer, criterion, amp=False, clip=clip, device=torch.device("cpu"))
    step.start(100, 5.0, 2.0)                                     # resumed mid-epoch, say
    sums = [5.0, 2.0]
    for i, (x, t) in enumerate(batches[:4]):
        lr = 0.001 * (i + 1)
        loss, correct = train_cifar.train_step(host_model, host_optimizer, criterion, x, t, lr, False, clip)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in host_model.parameters()]))
        assert norm.item() == pytest.approx(clip, rel=1e-5)       # the clipping acted
        sums = [sums[0] + loss * len(x), sums[1] + correct]
        assert step(x, t, lr).item() == loss
    assert step.read() == (*sums, None)
    for a, b in zip(model.state_dict().values(), host_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), host_optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    before = {k: v.clone() for k, v in model.named_parameters()}
    x, t = batches[4]
    assert train_cifar.train_step(host_model, host_optimizer, criterion, x, t * float("nan"), 0.01, False,
                                  clip) is None
    step(x, t * float("nan"), 0.01)                               # the 105th step of the run
    step(x, t * float("inf"), 0.01)                               # another bad one
    step(*batches[5], 0.01)                                       # a good one after them: skipped too
    assert step.read() == (*sums, 105)                           # nothing added for the bad steps
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="fused AdamW"):
        DeviceStep(*device_step_setup(fused_optimizer=False)[:3], amp=False, clip=1.0,
                   device=torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("model_kind", ["gelu_then_batchnorm", "fused_gelu_batchnorm", "torch_compile"])
def test_device_step_cuda_only_graph_replays_what_the_eager_step_does(model_kind):
    """The whole step captured in a CUDA graph and replayed: the same weights as the eager step (the
    same kernels), the warm-up of the capture undone (BatchNorm's running statistics too), a bad step
    skipped. The model as convmixer.py builds it; with GELU -> BatchNorm fused (fast/gelu_batchnorm.py);
    and called through torch.compile (--compile --step-mode graph: not a default, as it is untested)."""
    from fast.gelu_batchnorm import use_fused_gelu_batch_norm
    from fast.step import DeviceStep
    results = []
    for graph in (False, True):
        model, optimizer, criterion, batches = device_step_setup()
        model = model.cuda()
        if model_kind == "fused_gelu_batchnorm":
            use_fused_gelu_batch_norm(model)
        net = torch.compile(model) if model_kind == "torch_compile" else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.0, device="cuda"), eps=1e-3,
                                      fused=True, capturable=True)
        step = DeviceStep(net, optimizer, criterion, amp=True, clip=1.0, device=torch.device("cuda"),
                          graph=graph)
        step.start(0, 0.0, 0.0)
        for i, (x, t) in enumerate(batches[:5]):
            step(x.cuda(), t.cuda(), 0.001 * (i + 1))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        step(batches[5][0].cuda(), batches[5][1].cuda() * float("nan"), 0.01)
        *sums, bad = step.read()
        assert bad == 6 and all(torch.equal(p, before[k]) for k, p in model.named_parameters())
        results.append((before, sums))
    (eager, eager_sums), (graphed, graphed_sums) = results
    for k, v in eager.items():
        torch.testing.assert_close(graphed[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert graphed_sums == pytest.approx(eager_sums, rel=1e-5)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compile_trains_as_the_eager_model_does(tmp_path):
    """--compile (torch.compile of the model, which the training step calls; here with the device
    step, which calls the same model): the eager run's losses and accuracy, up to float rounding."""
    flags = ["--hdim", "16", "--depth", "1", "--psize", "4", "--epochs", "2", "--batch-size", "100",
             "--fake-data", "400", "--device", "cpu", "--workers", "0", "--step-mode", "device"]
    run_script(*flags, "--out", tmp_path / "eager")
    first_line = run_script(*flags, "--compile", "--out", tmp_path / "compiled").stdout.splitlines()[0]
    assert ", step mode device, torch.compile; writing to " in first_line          # says how it runs
    eager, compiled = (without_timings(read_log(tmp_path / name)) for name in ("eager", "compiled"))
    losses = [[r.pop("train_loss", None) for r in log] for log in (eager, compiled)]
    assert len(eager) == 3 and losses[0][0] is not None
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for a, b in zip(compiled, eager):       # a near-tie may flip a prediction: one of the 80 test images
        assert {k: v for k, v in a.items() if "acc" not in k} == {k: v for k, v in b.items() if "acc" not in k}
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 100 / 80 for k in a if "acc" in k), (a, b)


def test_fused_norm_trains_as_gelu_then_batchnorm_does(tmp_path, gelu_batchnorm, monkeypatch, capsys):
    """--fused-norm (opt-in; on a CPU in Triton's interpreter, as here): the losses and accuracies of
    the run with nn.GELU -> nn.BatchNorm2d, up to float rounding; the first line and the log say it.
    Without CUDA or the interpreter it is refused at the start, and a run that has it continues there
    only with --no-fused-norm."""
    flags = ["--hdim", "4", "--depth", "1", "--ksize", "3", "--psize", "8", "--epochs", "2", "--batch-size",
             "25", "--fake-data", "100", "--device", DEVICE, "--workers", "0", "--fast"]
    import train_cifar
    model, _ = train_cifar.prepare_model(train_cifar.parse_args([*flags, "--fused-norm"]), torch.device(DEVICE))
    assert sum(isinstance(m, gelu_batchnorm.FusedGeluBatchNorm2d) for m in model.modules()) == 1 + 2 * 1
    run_script(*flags, "--out", tmp_path / "pair")
    first_line = run_script(*flags, "--fused-norm", "--out", tmp_path / "fused").stdout.splitlines()[0]
    assert ", fused GELU -> BatchNorm" in first_line and "; writing to " in first_line
    assert [read_log(tmp_path / name)[0]["config"]["fused_norm"] for name in ("pair", "fused")] == [False, True]
    pair, fused = (without_timings(read_log(tmp_path / name)) for name in ("pair", "fused"))
    losses = [[r.pop("train_loss", None) for r in log] for log in (pair, fused)]
    assert len(pair) == 3 and losses[0][0] is not None and losses[1] == pytest.approx(losses[0], rel=1e-4)
    for a, b in zip(fused, pair):           # a near-tie may flip a prediction: 1 of the 20 test images
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 100 / 20 for k in a if "acc" in k), (a, b)
        assert {k: v for k, v in a.items() if "acc" not in k} == {k: v for k, v in b.items() if "acc" not in k}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)          # a CPU without the interpreter:
    lines = error_lines_of_main(["--fused-norm", "--device", "cpu"], capsys)
    assert "error: --fused-norm runs Triton kernels, which need a CUDA device, not cpu" in lines[-1]
    from trainer import files                   # a fused run continued there (as if it were stopped)
    stored = torch.load(tmp_path / "fused" / "last.pt", weights_only=True)["recipe"]
    monkeypatch.setattr(files, "stored_resume_state", lambda out, keys: {"recipe": dict(stored)})
    resume = ["--resume", "--out", str(tmp_path / "fused"), "--device", "cpu"]
    with pytest.raises(train_cifar.Fail, match="continue it here with --resume --no-fused-norm"):
        files.read_resume_state(tmp_path / "fused", train_cifar.RECIPE_KEYS, train_cifar.parse_args(resume))
    args = train_cifar.parse_args([*resume, "--no-fused-norm"])
    recipe = files.read_resume_state(tmp_path / "fused", train_cifar.RECIPE_KEYS, args)["recipe"]
    assert recipe["fused_norm"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CUDA step modes")
def test_train_cifar_cuda_only_step_modes_train_alike(tmp_path):
    """A short --fast run with the step checked on the host, on the device, and replayed as a CUDA
    graph: the same schedule and data, so the same losses up to the order of floating-point sums.
    Its model.pt and last.pt, written from the GPU, hold CPU tensors: they load on any machine."""
    logs = {}
    for mode in ("host", "device", "graph"):
        run_script("--hdim", "64", "--depth", "2", "--ksize", "9", "--psize", "2", "--epochs", "2",
                   "--batch-size", "64", "--fake-data", "1024", "--fast", "--step-mode", mode,
                   "--out", tmp_path / mode)
        logs[mode] = [r["train_loss"] for r in read_log(tmp_path / mode) if "train_loss" in r]
        assert storage_locations(tmp_path / mode / "model.pt") == storage_locations(tmp_path / mode / "last.pt") \
            == {"cpu"}
    for mode in ("device", "graph"):
        assert logs[mode] == pytest.approx(logs["host"], rel=0.02), (mode, logs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_host_run_continues_cuda_only_as_a_graph_run(tmp_path):
    """What a long run started with the host step may do once the graph's tests pass: stopped
    mid-epoch, it continues with --resume --step-mode graph (its fused AdamW's state loaded, then
    made capturable) and trains on as its uninterrupted twin does, up to the order of sums."""
    new_run = ["--hdim", "64", "--depth", "2", "--ksize", "9", "--psize", "2", "--epochs", "2",
               "--batch-size", "64", "--fake-data", "1024", "--fast", "--step-mode", "host"]
    run_script(*new_run, "--out", tmp_path / "reference")
    out = tmp_path / "run"
    start_or_resume(out, killer=["rename", 10], new_run=new_run).communicate(timeout=300)
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (0, 7) and stopped["recipe"]["step_mode"] == "host"
    result = run_script("--resume", "--out", out, "--step-mode", "graph")
    assert "resuming with --step-mode graph (it was host)" in result.stdout
    assert ", step mode graph; writing to " in result.stdout
    resumes = [r for r in read_log(out) if r.get("resumed")]
    assert [(r["epoch"], r["step"], r["step_mode"]) for r in resumes] == [(1, 7, "graph")]
    losses = {name: [r["train_loss"] for r in read_log(tmp_path / name) if "train_loss" in r]
              for name in ("reference", "run")}
    assert len(losses["run"]) == 2 and losses["run"] == pytest.approx(losses["reference"], rel=0.02), losses
    adamw = torch.load(out / "last.pt", weights_only=True)["optimizer"]["state"]    # moments kept: 2 x 16 steps
    assert [float(state["step"]) for state in adamw.values()] == [32.0] * len(adamw)


def test_without_triton_the_fast_path_says_it_keeps_pytorchs_depthwise_convs(capsys):
    """Triton comes with torch's Linux CUDA wheels only. Where it cannot be imported (Windows, say),
    the log records it as None on CUDA, and the run's first line says that the depthwise convs
    stay PyTorch's (the batch augmentation on the device stays too)."""
    from argparse import Namespace

    from trainer.files import triton_version
    from trainer.housekeeping import announce
    hidden = subprocess.run([sys.executable, "-c", "import sys; sys.modules['triton'] = None\n"
                             "from trainer.files import triton_version; print(triton_version())"],
                            cwd=HERE, capture_output=True, text=True, timeout=120)
    assert hidden.stdout.strip() == "None", hidden.stdout + hidden.stderr
    installed = importlib.util.find_spec("triton")
    assert triton_version() == (importlib.import_module("triton").__version__ if installed else None)
    recipe = Namespace(hdim=256, depth=8, ksize=9, psize=1, n_train=50_000, epochs=200, fast=True,
                       step_mode="host", compile=False, fused_norm=False)
    for versions, says in [({"triton": None}, " (fast path; no Triton here, so PyTorch's depthwise convs)"),
                           ({"triton": "3.6.0"}, " (fast path)"), ({}, " (fast path)")]:      # {}: a CPU
        announce(recipe, 706_058, 781, {"device": "GPU", "code": None, "versions": versions}, "runs/x")
        assert f" on GPU{says}; writing to runs/x" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels are swapped in on CUDA")
def test_prepare_model_cuda_only_swaps_in_the_triton_kernels_where_triton_is(monkeypatch):
    import train_cifar
    from argparse import Namespace
    from fast.depthwise import FastDepthwiseConv2d
    from fast.gelu_batchnorm import FusedGeluBatchNorm2d
    from trainer.files import where_it_ran
    recipe = Namespace(hdim=16, depth=1, ksize=9, psize=1, fast=True, compile=False, fused_norm=False)
    model, _ = train_cifar.prepare_model(recipe, torch.device("cuda"))
    assert FastDepthwiseConv2d in {type(m) for m in model.modules()}
    assert FusedGeluBatchNorm2d not in {type(m) for m in model.modules()}            # opt-in
    fused, _ = train_cifar.prepare_model(Namespace(**{**vars(recipe), "fused_norm": True}), torch.device("cuda"))
    assert {FastDepthwiseConv2d, FusedGeluBatchNorm2d} <= {type(m) for m in fused.modules()}
    assert where_it_ran(torch.device("cuda"))["versions"]["triton"] == importlib.import_module("triton").__version__
    monkeypatch.setattr(train_cifar, "triton_version", lambda: None)       # as where it is missing
    model, _ = train_cifar.prepare_model(recipe, torch.device("cuda"))
    assert FastDepthwiseConv2d not in {type(m) for m in model.modules()}
    assert model(torch.randn(2, 3, 32, 32, device="cuda")).shape == (2, 10)


# The recipe, element by element: each test pins one element by its effect (tools/mutants.py puts
# deliberate bugs into a copy of the code and checks that these tests notice).

@pytest.fixture
def keep_signal_handlers():
    """train() installs SIGINT/SIGTERM handlers; give pytest its own back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


FAKE = ["--hdim", "8", "--depth", "1", "--ksize", "3", "--psize", "4", "--device", "cpu", "--workers", "0"]


def test_learning_rate_and_clipping_reach_every_step(tmp_path, monkeypatch, keep_signal_handlers):
    import train_cifar
    steps, original = [], train_cifar.train_step

    def recording(net, optimizer, criterion, images, targets, lr, amp, clip, *rest):
        result = original(net, optimizer, criterion, images, targets, lr, amp, clip, *rest)
        steps.append((lr, [g["lr"] for g in optimizer.param_groups], clip, len(images)))
        return result

    monkeypatch.setattr(train_cifar, "train_step", recording)
    args = train_cifar.parse_args([*FAKE, "--epochs", "2", "--batch-size", "50", "--fake-data", "250",
                                   "--out", str(tmp_path / "o")])
    train_cifar.train(args)
    expected = [train_cifar.one_cycle_lr((i + 1) / 10, 0.01) for i in range(10)]   # 5 steps an epoch
    assert [lr for lr, *_ in steps] == pytest.approx(expected)
    assert all(group_lrs == [lr, lr] for lr, group_lrs, *_ in steps)      # what AdamW really used
    assert {clip for *_, clip, _ in steps} == {1.0} and {n for *_, n in steps} == {50}
    assert len(set(round(lr, 12) for lr, *_ in steps[:5])) == 5            # changes inside an epoch


def test_one_cycle_schedule():
    import train_cifar
    lr = train_cifar.one_cycle_lr
    assert lr(0.0, 0.01) == 0 and lr(0.2, 0.01) == pytest.approx(0.005)
    assert lr(0.4, 0.01) == pytest.approx(0.01) and lr(0.8, 0.01) == pytest.approx(0.0005)
    assert lr(0.6, 0.01) == pytest.approx(0.00525) and lr(0.9, 0.01) == pytest.approx(0.00025)
    assert lr(1.0, 0.01) == pytest.approx(0.0)


def test_gradient_clipping_bounds_the_update():
    import train_cifar
    recipe = train_cifar.parse_args(FAKE)
    torch.manual_seed(0)
    model = ConvMixer(8, 1, 3, 4, n_classes=10)
    optimizer = train_cifar.make_optimizer(model, recipe)
    norms = []
    optimizer.step = lambda: norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    targets = nn.functional.one_hot(torch.arange(8) % 10, 10).float()

    def steep_loss(logits, targets):                    # gradients far above norm 1
        return 1000 * nn.functional.cross_entropy(logits, targets)
    for clip in (1.0, 0.0):                             # 0: no clipping
        train_cifar.train_step(model, optimizer, steep_loss, torch.randn(8, 3, 32, 32), targets, 0.01,
                               False, clip)
    assert norms[0] == pytest.approx(1.0, rel=1e-4) and norms[1] > 2


def test_weight_decay_applies_to_conv_and_linear_weights_only():
    import train_cifar
    recipe = train_cifar.parse_args(FAKE)
    model = ConvMixer(8, 1, 3, 4, n_classes=10)
    for m in model.modules():                          # non-trivial BatchNorm weights and biases
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = train_cifar.make_optimizer(model, recipe)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)                   # Adam's own step is then zero: only decay acts
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.01 * 0.01 if p.ndim > 1 else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)
    assert optimizer.defaults["eps"] == 1e-3


def test_loss_is_label_smoothed_cross_entropy_on_soft_targets(tmp_path, keep_signal_handlers):
    import train_cifar
    run = train_cifar.Run(train_cifar.parse_args([*FAKE, "--epochs", "1", "--batch-size", "50",
                                                  "--fake-data", "200", "--out", str(tmp_path / "o")]))
    logits = torch.tensor([[2.0, -1.0, 0.5, 0, 0, 0, 0, 0, 0, 1.0]])
    targets = torch.zeros(1, 10)
    targets[0, 0], targets[0, 2] = 0.7, 0.3                                  # a mixed image
    smoothed = 0.9 * targets + 0.1 / 10
    expected = -(smoothed * logits.log_softmax(1)).sum()
    assert run.criterion(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_val_is_the_last_training_images_and_never_trained_on(tmp_path, keep_signal_handlers):
    import train_cifar
    run = train_cifar.Run(train_cifar.parse_args([*FAKE, "--epochs", "1", "--batch-size", "50",
                                                  "--fake-data", "500", "--val", "100",
                                                  "--out", str(tmp_path / "o")]))
    images, labels = train_cifar.load_fake(500, True, 0)
    assert torch.equal(run.val[0], images[400:]) and torch.equal(run.val[1], labels[400:])
    assert torch.equal(run.data["dataset"].images, images[:400])     # what the batches index


def test_defaults_are_the_papers_cifar10_recipe():
    import train_cifar
    a = train_cifar.parse_args([])
    assert (a.hdim, a.depth, a.ksize, a.psize, a.epochs, a.batch_size) == (256, 8, 9, 1, 200, 64)
    assert (a.lr, a.wd, a.eps, a.clip, a.label_smoothing, a.amp) == (0.01, 0.01, 1e-3, 1.0, 0.1, True)
    assert (a.scale, a.ra_n, a.ra_m, a.ra_mstd, a.ra_p) == (0.75, 2, 9, 0.5, 0.5)
    assert (a.mixup, a.cutmix, a.reprob) == (0.5, 0.5, 0.25)
    # The fast path and its graph step on CUDA; the plain reference, its loss checked on the host,
    # on a CPU.
    cuda = torch.cuda.is_available()
    assert a.fast == cuda and a.step_mode == ("graph" if cuda else "host") and not a.compile
    assert train_cifar.parse_args(["--device", "cpu"]).fast is False
    cpu_fast = train_cifar.parse_args(["--device", "cpu", "--fast"])
    assert cpu_fast.fast is True and cpu_fast.step_mode == "host"
    optimizer = train_cifar.make_optimizer(ConvMixer(8, 1, 3, 4), a)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)


def test_on_cuda_the_default_step_is_the_fast_paths_graph_and_the_benchmark_names_each_path(monkeypatch):
    """The step-mode default, as a machine with CUDA gets it; the benchmark's paths give every flag
    in full, so that "plain" is not the CUDA default (the fast path) and "fast" not its graph step."""
    import train_cifar
    from fast import benchmark
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    modes = {tuple(flags): (a.fast, a.step_mode, a.compile) for flags in
             [[], ["--compile"], ["--no-fast"], ["--step-mode", "device"], ["--fast", "--step-mode", "host"]]
             for a in [train_cifar.parse_args(["--device", "cuda", *flags])]}
    assert modes == {(): (True, "graph", False), ("--compile",): (True, "host", True),
                     ("--no-fast",): (False, "host", False), ("--step-mode", "device"): (True, "device", False),
                     ("--fast", "--step-mode", "host"): (True, "host", False)}
    args = benchmark.parse_args(["--device", "cuda", "--out", "unused"])
    recipes = {path: benchmark.recipe_for(args, 64, path) for path in benchmark.PATHS}
    assert {path: (r.fast, r.step_mode) for path, r in recipes.items()} == {
        "plain": (False, "host"), "fast": (True, "host"), "fast_device": (True, "device"),
        "fast_graph": (True, "graph")}


def test_cpu_transform_crops_flips_and_erases_at_the_recipes_rates():
    """train_transform without RandAugment, on a horizontal ramp: the crop's width shows in the
    output's range, a flip in its direction, an erased box in values no pixel can take."""
    import train_cifar
    recipe = train_cifar.parse_args(["--ra-n", "0"])
    transform = train_cifar.train_transform(recipe)
    ramp = (torch.arange(32) * 8).view(1, 1, 32).expand(3, 32, 32).to(torch.uint8)
    torch.manual_seed(0)
    flipped, erased, widths = 0, 0, []
    for _ in range(2000):
        x = transform(ramp)[0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]            # back to [0, 1]
        if (x < -0.1).any() or (x > 1.1).any():                            # N(0, 1) noise: erased
            erased += 1
            continue
        row = x[16]
        flipped += int(row[0] > row[-1])
        widths.append((row.max() - row.min()).item() * 255 / 8 + 1)        # ~ the crop's width
    assert abs(erased / 2000 - 0.25) < 0.04
    assert abs(flipped / len(widths) - 0.5) < 0.05
    widths = torch.tensor(widths)
    # scale 0.75-1 of the area, aspect 3/4-4/3: widths from 24 pixels (bicubic may overshoot the
    # range a little); measured 29.4 on average, 26.8 with scale 0.5-1
    assert widths.min() >= 23.5 and widths.quantile(0.1) >= 25.5 and 28.7 < widths.mean() < 30


def test_batch_mixing_chooses_mixup_or_cutmix_per_batch():
    import train_cifar
    mix = train_cifar.batch_mixing(train_cifar.parse_args([]))
    images = (torch.arange(10).float() * 10).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    kinds = [len(torch.unique(mix(images, torch.arange(10))[0][0])) for _ in range(200)]
    assert 70 < kinds.count(1) < 130 and kinds.count(1) + kinds.count(2) == 200   # 1: MixUp, 2: CutMix


def test_each_epoch_shuffles_the_images_from_seed_and_epoch_alone():
    import train_cifar
    plans = {(seed, epoch): train_cifar.EpochPlan(1000, 64, seed, epoch) for seed in (0, 1) for epoch in (0, 1)}
    for plan in plans.values():
        assert sorted(plan.order) == list(range(1000)) and plan.steps == 15          # last batch dropped
        assert plan.order != list(range(1000)) and len(set(plan.image_seeds)) == 1000
    orders = [tuple(p.order) for p in plans.values()]
    assert len(set(orders)) == 4                                          # differs by seed and epoch
    assert train_cifar.EpochPlan(1000, 64, 1, 1).order == plans[1, 1].order
    batches = plans[0, 0].batches(first_step=3)
    assert len(batches) == 12 and [i for i, _ in batches[0]] == plans[0, 0].order[192:256]


def record_training_batches(monkeypatch, argv):
    """Run train_cifar.train on 64 copies of one image (so that any two augmented images differ only
    by their random draws) and return what each step was given: [(images, targets)] in order."""
    import train_cifar
    image = sample_images(1)[0]
    monkeypatch.setattr(train_cifar, "load_fake",
                        lambda n, train, seed: (image.expand(n, 3, 32, 32).clone(), torch.arange(n) % 10))
    steps = []

    def record(net, optimizer, criterion, images, targets, *rest):
        steps.append((images.clone(), targets.clone()))
        return 2.3, 0.0
    monkeypatch.setattr(train_cifar, "train_step", record)
    train_cifar.train(train_cifar.parse_args([*FAKE, "--fake-data", "64", "--batch-size", "16",
                                              "--epochs", "2", *argv]))
    return steps


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_every_random_choice_changes_where_the_recipe_says_and_repeats_with_the_seed(
        path, tmp_path, monkeypatch, keep_signal_handlers):
    """Per image (crop, flip, ops, magnitudes, erasing), per step (MixUp or CutMix, and its lambda),
    per epoch (the order and the images' draws) and, with --fast, per chunk of steps: each choice is
    drawn anew where the recipe draws it, shared where it shares it, and the same for the same seed."""
    import fast.augment
    monkeypatch.setattr(fast.augment, "AUGMENT_CHUNK_IMAGES", 32)        # 2 chunks of 2 steps an epoch
    flags = ["--fast" if path == "fast" else "--no-fast"]
    runs = {}
    for name, argv in {"unmixed": ["--mixup", "0", "--cutmix", "0"], "mixed": [],
                       "mixed again": [], "other seed": ["--seed", "1"]}.items():
        runs[name] = record_training_batches(monkeypatch, [*flags, *argv, "--out", str(tmp_path / name)])
    # Per image, per step, per chunk and per epoch: no two augmented images of the run are alike.
    images = torch.cat([x for x, _ in runs["unmixed"]])                    # (8 steps * 16, 3, 32, 32)
    assert len(images) == 128
    flat = images.flatten(1)
    assert len(torch.unique(flat, dim=0)) == 128
    # Per step: one MixUp/CutMix draw for the whole batch, a new one at every step.
    lambdas = []
    for _, targets in runs["mixed"]:
        shares = targets.max(1).values[targets.max(1).values < 1]       # max(lambda, 1 - lambda) of
        assert len(shares) > 8 and torch.allclose(shares, shares[0])     # each row of two classes
        lambdas.append(round(shares[0].item(), 6))
    assert len(set(lambdas)) == len(lambdas) == 8, lambdas
    # The same seed repeats every draw; another seed changes them.
    for (x, t), (x_again, t_again) in zip(runs["mixed"], runs["mixed again"]):
        assert torch.equal(x, x_again) and torch.equal(t, t_again)
    assert not any(torch.equal(x, x_other) for (x, _), (x_other, _) in zip(runs["mixed"], runs["other seed"]))


def test_evaluation_runs_in_eval_mode_and_leaves_the_model_training():
    import train_cifar
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.BatchNorm1d(10))
    model[2].running_mean.uniform_(-3, 3)                  # statistics far from any batch's
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        labels = model.eval()((images.float() / 255 - mean) / std).argmax(1)
    model.train()
    assert train_cifar.evaluate(model, images, labels, torch.device("cpu"), False) == [100.0]
    assert model.training


def test_evaluation_on_a_cpu_takes_batches_of_20_and_every_image_once_in_order():
    # Batches of 100 made the CPU evaluation of ConvMixer-256/8 p1 1.8x slower (its layers' outputs
    # fresh memory from the OS); of 1,000, ConvMixer-256/8 p2 3x slower.
    import train_cifar
    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    images = torch.randint(0, 256, (250, 3, 32, 32), dtype=torch.uint8)
    logits = train_cifar.predict(model, images, torch.device("cpu"), False)
    assert seen == [20] * 12 + [10] and logits.shape == (250, 10) and logits.dtype == torch.float32
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((images.float() / 255 - mean) / std)
    torch.testing.assert_close(logits, expected)                        # each image's own logits
    seen.clear()
    train_cifar.predict(model, images, torch.device("cpu"), False, batch_size=1000)
    assert seen == [250]


def test_flip_tta_adds_the_logits_of_the_horizontal_mirror():
    import train_cifar
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    with torch.no_grad():
        plain, mirrored, upside_down = model(x), model(x.flip(3)), model(x.flip(2))
    labels = (plain + mirrored).argmax(1)
    labels[:100] = (plain + upside_down).argmax(1)[:100]     # half of them: what a vertical flip says
    expected = 100.0 * ((plain + mirrored).argmax(1) == labels).float().mean().item()
    accuracy, flip_tta = train_cifar.evaluate(model, images, labels, torch.device("cpu"), False, flip_tta=True)
    assert flip_tta == pytest.approx(expected) and flip_tta < 100
    assert accuracy == pytest.approx(100.0 * (plain.argmax(1) == labels).float().mean().item())


@pytest.mark.parametrize("mixer", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_images_and_targets_alike(mixer):
    import train_cifar
    other = "cutmix" if mixer == "mixup" else "mixup"
    recipe = train_cifar.parse_args(["--device", "cpu", f"--{other}", "0"])
    mix = train_cifar.batch_mixing(recipe)
    values = torch.arange(10).float() * 10                 # image i is filled with 10 * i
    images = values.view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    mixed, targets = mix(images, torch.arange(10))         # label i for image i
    assert targets.shape == (10, 10) and torch.allclose(targets.sum(1), torch.ones(10))
    assert (targets.max(1).values < 0.999).all()           # every image is mixed with another
    torch.testing.assert_close(mixed.mean((1, 2, 3)), targets @ values, atol=1e-3, rtol=1e-4)
    distinct_values = [len(torch.unique(m)) for m in mixed]
    assert all(n == (1 if mixer == "mixup" else 2) for n in distinct_values), distinct_values
    torch.manual_seed(0)
    alphas = [float(mix(images, torch.arange(10))[1].max(1).values[0]) for _ in range(200)]
    # alpha 0.5: the larger share is spread over (0.5, 1), mean about 0.82 (Beta(0.5, 0.5))
    assert 0.75 < sum(alphas) / len(alphas) < 0.9


def test_every_mutant_of_tools_mutants_still_applies_to_the_code():
    """tools/mutants.py (run by hand: it takes minutes) edits the code by exact text; a change of
    the code that its edits no longer match is caught here, in CI."""
    sys.path.insert(0, str(HERE / "tools"))
    try:
        import mutants
    finally:
        sys.path.remove(str(HERE / "tools"))
    assert len(mutants.MUTANTS) >= 20 and len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    for m in mutants.MUTANTS:
        assert (HERE / m.file).read_text().count(m.old) == 1, m.name
        assert m.old != m.new, m.name


def test_benchmark_measures_every_path_at_both_batch_sizes_in_one_file(tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "fast" / "benchmark.py"), "--hdim", "16",
                             "--depth", "1", "--ksize", "3", "--psize", "4", "--batch-sizes", "8", "16",
                             "--steps", "2", "--device", "cpu", "--workers", "0",
                             "--out", str(tmp_path / "bench")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    bench = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert bench["config"] == {"hdim": 16, "depth": 1, "ksize": 3, "psize": 4, "amp": False, "compile": False,
                               "fused_norm": False, "workers": 0, "steps": 2}
    for b in (8, 16):
        section = bench[f"batch_{b}"]
        assert list(section) == ["plain", "fast", "fast_device"]               # no CUDA graph on a CPU
        for path, m in section.items():
            assert m["img_s"] > 0 and m["model_only_img_s"] > 0
            assert m["recipe_training_seconds"] == pytest.approx(200 * 50_000 / m["img_s"])
            assert ("augment_only_img_s" in m) == (path != "plain")
            profile = m["profile"]                  # on a CPU: operators by their own time
            assert profile["steps"] == 2 and 0 < profile["busy_fraction"] <= 1.05
            times = [row["ms_per_step"] for row in profile["top"]]
            assert times == sorted(times, reverse=True) and sum(times) <= profile["busy_ms_per_step"] + 1e-6
            assert any("convolution" in row["name"] for row in profile["top"])
            assert profile["launches_per_step"] >= len(profile["top"])     # each row launched at least once
            assert f"batch {b}, {path}, profile of 2 steps" in result.stdout
        fast, plain = section["fast"]["img_s"], section["plain"]["img_s"]
        assert section["fast"]["speedup_over_plain"] == pytest.approx(fast / plain)


def test_benchmark_saves_each_path_as_soon_as_it_is_measured(tmp_path, monkeypatch):
    from fast import benchmark
    args = benchmark.parse_args(["--hdim", "8", "--depth", "1", "--ksize", "3", "--psize", "8",
                                 "--batch-sizes", "16", "--paths", "fast", "plain", "--steps", "1",
                                 "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "b")])
    measure = benchmark.measure_path

    def cut_short_after_the_first_path(args, path, *rest):      # as a time limit would
        if path != "fast":
            raise KeyboardInterrupt
        return measure(args, path, *rest)

    monkeypatch.setattr(benchmark, "measure_path", cut_short_after_the_first_path)
    with pytest.raises(KeyboardInterrupt):
        benchmark.benchmark(args)
    bench = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert bench["batch_16"]["fast"]["img_s"] > 0 and bench["batch_16"]["fast"]["profile"]["steps"] == 1
    assert "plain" not in bench["batch_16"] and not list((tmp_path / "b").glob("*.tmp"))


def test_benchmark_fused_norm_puts_the_fused_gelu_batchnorm_in_the_fast_paths_only(tmp_path, gelu_batchnorm):
    from fast import benchmark
    # Small, since Triton's interpreter runs one program at a time: 2 channels x 4 images.
    args = benchmark.parse_args(["--hdim", "2", "--depth", "1", "--ksize", "3", "--psize", "8",
                                 "--batch-sizes", "4", "--paths", "plain", "fast_device", "--steps", "1",
                                 "--fused-norm", "--device", "cpu", "--workers", "0", "--out", str(tmp_path)])
    bench = benchmark.benchmark(args)
    assert bench["config"]["fused_norm"] is True
    operators = {path: " ".join(row["name"] for row in bench["batch_4"][path]["profile"]["top"])
                 for path in ("plain", "fast_device")}
    assert "convmixer::gelu_batch_norm" in operators["fast_device"]
    assert "gelu_batch_norm" not in operators["plain"]


def test_train_cifar_does_not_import_the_benchmark():
    """fast/benchmark.py imports train_cifar.py, and not the other way round."""
    import ast
    tree = ast.parse((HERE / "train_cifar.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [name for name in imported if "benchmark" in name]
    result = subprocess.run([sys.executable, "-c", "import sys, train_cifar; "
                             "sys.exit('fast.benchmark' in sys.modules)"], cwd=HERE, capture_output=True)
    assert result.returncode == 0


# ---------------------------------------------------------------------------------------------
# fast/depthwise.py: the Triton depthwise convolution against nn.Conv2d (CPU: Triton interpreter)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def fast_depthwise():
    pytest.importorskip("triton")
    from fast import depthwise
    return depthwise


@pytest.mark.parametrize("B,C,H,W,k", [
    (1, 3, 8, 8, 3), (2, 4, 7, 5, 4), (3, 2, 9, 70, 9), (2, 2, 40, 6, 2), (1, 1, 1, 1, 1),
    (17, 2, 5, 6, 3), (2, 3, 32, 32, 9), (2, 2, 50, 20, 8), (2, 2, 12, 31, 7), (64, 1, 3, 3, 3),
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


def test_benchmark_depthwise_breakdown_times_both_kernels(fast_depthwise):
    from fast import benchmark
    args = benchmark.parse_args(["--hdim", "2", "--ksize", "3", "--psize", "8", "--device", DEVICE])
    args.batch_size = 2
    default_rows = fast_depthwise.TOEPLITZ_ROWS
    timings = benchmark.depthwise_breakdown(args, torch.device(DEVICE), amp=False, repeats=1)
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


def check_kernels(code="import check_kernels, sys; sys.exit(check_kernels.main())"):
    """Run fast/check_kernels.py's checks in a fresh process without the Triton interpreter."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no CUDA toolchain (ptxas, cuobjdump) to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], cwd=HERE / "fast", env=env,
                          capture_output=True, text=True, timeout=900)


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
    norm = [line.split() for line in proc.stdout.splitlines() if "GELU -> BatchNorm" in line]
    assert [row[0] for row in norm] == ["plane_stats_kernel", "channel_stats_kernel", "normalize_kernel",
                                        "running_stats_kernel", "grad_sums_kernel", "grad_coefficients_kernel",
                                        "grad_input_kernel"]                # fast/gelu_batchnorm.py's
    assert all(row[1] == "bf16" and int(row[3]) == 0 for row in norm)


def test_check_kernels_reports_spilled_registers():
    # Forced beyond TOEPLITZ_MAX_WIDTH, the float32 "toeplitz" kernels spill at W = 64.
    proc = check_kernels("import sys, torch, check_kernels\n"
                         "from check_kernels import fast_depthwise\n"
                         "fast_depthwise.TOEPLITZ_MAX_WIDTH = 64\n"
                         "case = ('W=64', 8, 16, 64, 9, torch.float32, 'toeplitz')\n"
                         "sys.exit(check_kernels.main([case], norm_cases=[]))")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "<- spills" in proc.stdout and "kernel(s) with problems" in proc.stdout


def test_check_kernels_compiles_for_the_gpu_asked_for():
    # --arch reaches the compiler: a T4 (sm_75) has no bfloat16 tensor cores, an A100 (sm_80) has,
    # and a B200's (sm_100) are counted too, though its products compile to other (tcgen05) MMAs.
    case = "[('CIFAR-10 at p2', 64, 16, 16, 5, torch.bfloat16, 'auto')]"
    proc = check_kernels(f"import sys, torch, check_kernels\n"
                         f"main = lambda arch: check_kernels.main({case}, arch, norm_cases=[])\n"
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


# ---------------------------------------------------------------------------------------------
# fast/gelu_batchnorm.py: GELU -> BatchNorm2d fused, against the pair (CPU: Triton interpreter)

@pytest.fixture(scope="module")
def gelu_batchnorm():
    pytest.importorskip("triton")
    from fast import gelu_batchnorm
    return gelu_batchnorm


def gelu_then_batchnorm(gelu_batchnorm, channels, seed=0):
    """nn.GELU -> nn.BatchNorm2d with random affine parameters and running statistics, and the fused
    module made from a copy of that BatchNorm2d."""
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        for t, (low, high) in zip([norm.weight, norm.bias, norm.running_mean, norm.running_var],
                                  [(0.5, 1.5), (-0.5, 0.5), (-0.2, 0.2), (0.5, 1.5)]):
            t.uniform_(low, high)
    fused = gelu_batchnorm.FusedGeluBatchNorm2d(copy.deepcopy(norm))
    return nn.Sequential(nn.GELU(), norm).to(DEVICE), fused.to(DEVICE)


def output_and_gradients(module, z, dy, residual=None):
    """The pair's or the fused module's output (+ residual, if given) and the gradients of z and the
    BatchNorm's weight and bias."""
    if isinstance(module, nn.Sequential):
        norm, y = module[1], module(z) if residual is None else module(z) + residual
    else:
        norm, y = module, module(z, residual=residual)
    return [y, *torch.autograd.grad(y, (z, norm.weight, norm.bias), dy)]


def assert_outputs_and_gradients_close(expected, got, rtol, atol, where=""):
    """Output and the input, weight and bias gradients against the pair's, each in the pair's dtype
    and shape; atol is relative to the largest value, where it exceeds 1."""
    for name, e, g in zip(["output", "grad_input", "grad_weight", "grad_bias"], expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(g.float(), e.float(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{where}{name}: {m}")


def buffers_of(module):
    norm = module[1] if isinstance(module, nn.Sequential) else module
    return [norm.running_mean, norm.running_var, norm.num_batches_tracked]


@pytest.mark.parametrize("B,C,H,W", [(4, 3, 5, 7), (3, 4, 32, 32), (2, 2, 40, 40), (1, 2, 1, 2)])
def test_fused_gelu_batchnorm_matches_gelu_then_batchnorm_float32(gelu_batchnorm, B, C, H, W):
    """Two training steps (the second normalizes with its own batch's statistics and moves the
    running ones again), then eval mode: the output, the gradients of the input, weight and bias,
    and the running statistics. 40 x 40 planes are larger than one program's block (1,024 values);
    (1, 2, 1, 2) has two values per channel, the fewest BatchNorm trains on."""
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, C)
    for step in range(2):
        z = (torch.randn(B, C, H, W, device=DEVICE) * 2 + 0.5).requires_grad_()
        dy = torch.randn(B, C, H, W, device=DEVICE)
        expected, got = output_and_gradients(pair, z, dy), output_and_gradients(fused, z, dy)
        assert_outputs_and_gradients_close(expected, got, rtol=1e-5, atol=1e-5, where=f"step {step}, ")
        for e, g in zip(buffers_of(pair), buffers_of(fused)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert fused.num_batches_tracked.item() == 2
    z = torch.randn(B, C, H, W, device=DEVICE)
    torch.testing.assert_close(fused.eval()(z), pair.eval()(z))


def test_fused_gelu_batchnorm_in_half_precision_normalizes_what_gelu_would_output(gelu_batchnorm):
    """16-bit input, as under autocast: GELU's output is rounded to float16 before BatchNorm sees
    it, and the fused kernels round it the same way. float16 takes the code path of bfloat16 and,
    unlike bfloat16, also runs in Triton's interpreter on a CPU."""
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 3)
    z = (torch.randn(4, 3, 8, 8, device=DEVICE) * 2).half().requires_grad_()
    dy = torch.randn(4, 3, 8, 8, device=DEVICE).half()
    assert_outputs_and_gradients_close(output_and_gradients(pair, z, dy), output_and_gradients(fused, z, dy),
                                       rtol=1e-2, atol=2e-3)
    for e, g in zip(buffers_of(pair), buffers_of(fused)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # The batch's statistics are those of GELU's float16 output, not of the float32 values before
    # rounding (their means differ by about 1e-5 here).
    _, mean, var = gelu_batchnorm.gelu_batch_norm(z.detach(), fused.weight, fused.bias, fused.eps)
    g = nn.functional.gelu(z.detach()).float()
    torch.testing.assert_close(mean, g.mean((0, 2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(var, g.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


def test_fused_gelu_batchnorm_reduces_a_batch_in_several_blocks(gelu_batchnorm, monkeypatch):
    """The per-channel kernels sum the per-plane statistics over the batch a block of images at a
    time (512 on a GPU): with blocks of 4, a batch of 10 takes two whole blocks and a partial one."""
    monkeypatch.setattr(gelu_batchnorm, "CHANNEL_BLOCK_IMAGES", 4)
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 3)
    z = (torch.randn(10, 3, 4, 5, device=DEVICE) * 2 + 0.5).requires_grad_()
    dy = torch.randn(10, 3, 4, 5, device=DEVICE)
    assert_outputs_and_gradients_close(output_and_gradients(pair, z, dy), output_and_gradients(fused, z, dy),
                                       rtol=1e-5, atol=1e-5)
    for e, g in zip(buffers_of(pair), buffers_of(fused)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("z_dtype", [torch.float32, torch.float16])
def test_fused_gelu_batchnorm_adds_the_skip_connection(gelu_batchnorm, z_dtype):
    """With a residual x: x + BatchNorm2d(GELU(z)), in the dtype that addition would have (a float16
    z with a float32 x gives float32), and x's gradient, the output's, in x's dtype; eval mode too.
    A residual of another shape is refused."""
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 3)
    z = (torch.randn(4, 3, 6, 5, device=DEVICE) * 2).to(z_dtype).requires_grad_()
    x = torch.randn(4, 3, 6, 5, device=DEVICE, requires_grad=True)
    dy = torch.randn(4, 3, 6, 5, device=DEVICE)
    y_pair, y_fused = pair(z) + x, fused(z, residual=x)
    expected = [y_pair, *torch.autograd.grad(y_pair, (z, x, pair[1].weight, pair[1].bias), dy)]
    got = [y_fused, *torch.autograd.grad(y_fused, (z, x, fused.weight, fused.bias), dy)]
    tolerance = 1e-5 if z_dtype == torch.float32 else 2e-3
    for name, e, g in zip(["output", "grad z", "grad x", "grad weight", "grad bias"], expected, got):
        assert g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance, msg=lambda m: f"{name}: {m}")
    for e, g in zip(buffers_of(pair), buffers_of(fused)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.eval()(z, residual=x), pair.eval()(z) + x)
    with pytest.raises(ValueError, match=r"residual of shape \(4, 3, 6, 4\) for an input of shape \(4, 3, 6, 5\)"):
        fused.train()(z, residual=x[..., :4])


def test_fused_gelu_batchnorm_does_its_per_channel_arithmetic_in_its_kernels(gelu_batchnorm):
    """The batch statistics, running-statistics updates and gradient coefficients are small kernels
    of the module's own (done with PyTorch ops, they took 29 launches a layer): the fused forward
    and backward run no PyTorch arithmetic at all. The pair and addition do."""
    from torch.profiler import profile
    arithmetic = {"aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::neg",
                  "aten::sum", "aten::mean", "aten::square", "aten::pow", "aten::rsqrt", "aten::lerp_",
                  "aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::cudnn_batch_norm",
                  "aten::cudnn_batch_norm_backward", "aten::gelu", "aten::gelu_backward"}
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 3)
    z = torch.randn(4, 3, 5, 5, device=DEVICE, requires_grad=True)
    x, dy = torch.randn(4, 3, 5, 5, device=DEVICE), torch.randn(4, 3, 5, 5, device=DEVICE)
    ran = {}
    for name, step in [("pair", lambda: pair(z) + x), ("fused", lambda: fused(z, residual=x))]:
        with profile() as prof:
            y = step()
            torch.autograd.grad(y, (z, *pair[1].parameters(), *fused.parameters()), dy, allow_unused=True)
        ran[name] = {event.name for event in prof.events()} & arithmetic
    assert ran["fused"] == set()
    assert {"aten::add", "aten::gelu", "aten::gelu_backward"} <= ran["pair"]


def assert_the_same_training_step(reference, model, x, loss_tolerance, grad_tolerance):
    """One forward and backward pass of each, in training mode: the same loss, gradients and (then)
    state_dict values, BatchNorm's running statistics among them."""
    loss_reference, loss = reference(x).square().sum(), model(x).square().sum()
    torch.testing.assert_close(loss, loss_reference, rtol=loss_tolerance, atol=loss_tolerance)
    loss_reference.backward()
    loss.backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=grad_tolerance, atol=grad_tolerance / 10,
                                   msg=lambda m: f"{name}: {m}")
    for (name, e), g in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fused_gelu_batchnorm_in_a_convmixer_keeps_state_dict_and_results(gelu_batchnorm):
    """Swapped into a ConvMixer (patch embedding and both halves of each block, the skip connections'
    additions too): the same state_dict keys, the same Parameter and buffer objects (an optimizer made
    before the swap still trains it), the same loss, gradients and running statistics after a
    training step, and in eval mode."""
    torch.manual_seed(0)
    plain = randomize_(ConvMixer(8, 2, 5, 2, 10)).to(DEVICE).train()
    fused = copy.deepcopy(plain)
    before = fused.state_dict(keep_vars=True)
    gelu_batchnorm.use_fused_gelu_batch_norm(fused)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("FusedGeluBatchNorm2d") == 1 + 2 * 2 and kinds.count("Identity") == 5
    assert kinds.count("FusedResidual") == 2 and "Residual" not in kinds      # x + ... in the kernel
    assert "GELU" not in kinds and "BatchNorm2d" not in kinds
    after = fused.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    x = torch.randn(4, 3, 12, 10, device=DEVICE)
    assert_the_same_training_step(plain, fused, x, loss_tolerance=1e-5, grad_tolerance=1e-4)
    torch.testing.assert_close(fused.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)


def test_fused_gelu_batchnorm_takes_only_convmixers_pair(gelu_batchnorm):
    """Other activations and BatchNorms without affine parameters, running statistics or a momentum
    are left as they are; the module refuses them, and a batch with one value per channel."""
    relu = ConvMixer(8, 1, 3, 2, 10, activation=nn.ReLU)
    kinds = [type(m) for m in relu.modules()]
    assert [type(m) for m in gelu_batchnorm.use_fused_gelu_batch_norm(relu).modules()] == kinds
    for gelu, kwargs in [(nn.GELU(approximate="tanh"), {}), (nn.GELU(), dict(affine=False)),
                         (nn.GELU(), dict(track_running_stats=False)), (nn.GELU(), dict(momentum=None))]:
        pair = nn.Sequential(gelu, nn.BatchNorm2d(4, **kwargs))
        assert [type(m) for m in gelu_batchnorm.use_fused_gelu_batch_norm(pair)] == [nn.GELU, nn.BatchNorm2d]
        if kwargs:
            with pytest.raises(ValueError, match="not an affine BatchNorm2d with running statistics"):
                gelu_batchnorm.FusedGeluBatchNorm2d(pair[1])
    with pytest.raises(ValueError, match="more than 1 value per channel, got input of shape"):
        gelu_batchnorm.FusedGeluBatchNorm2d(nn.BatchNorm2d(2))(torch.randn(1, 2, 1, 1, device=DEVICE))


@pytest.mark.skipif(DEVICE == "cpu" and not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_fused_gelu_batchnorm_compiles_into_one_graph(gelu_batchnorm):
    """Both ops are torch.library ops: torch.compile(fullgraph=True) keeps them (and the running
    statistics' updates) in one graph, with the eager module's loss, gradients and statistics."""
    torch.manual_seed(0)
    eager = gelu_batchnorm.use_fused_gelu_batch_norm(randomize_(ConvMixer(8, 1, 3, 2, 10)).to(DEVICE).train())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    assert_the_same_training_step(eager, compiled, x, loss_tolerance=1e-4, grad_tolerance=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 kernels are checked on a GPU")
@pytest.mark.parametrize("B,skip", [(64, True), (512, False)])
def test_fused_gelu_batchnorm_cuda_only_matches_the_pair_in_bfloat16_autocast(gelu_batchnorm, B, skip):
    """ConvMixer-256's shapes at batch 64 (with the skip connection's addition) and 512 (without),
    with a bfloat16 input, as a convolution gives it under autocast: output, gradients and running
    statistics against GELU -> BatchNorm2d (+ x)."""
    pair, fused = gelu_then_batchnorm(gelu_batchnorm, 256)
    z = (torch.randn(B, 256, 32, 32, device="cuda") * 2).bfloat16().requires_grad_()
    x = torch.randn(B, 256, 32, 32, device="cuda").bfloat16() if skip else None
    dy = torch.randn(B, 256, 32, 32, device="cuda").bfloat16()
    with torch.autocast("cuda", torch.bfloat16):
        expected, got = output_and_gradients(pair, z, dy, x), output_and_gradients(fused, z, dy, x)
    assert_outputs_and_gradients_close(expected, got, rtol=2e-2, atol=2e-2)
    for e, g in zip(buffers_of(pair), buffers_of(fused)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# RandAugment (train_cifar.py) and fast/augment.py: per-image batch augmentation against the
# readable CPU path (train_transform)

def sample_images(n, seed=0):
    """Real CIFAR-10 training images when available, else smooth random images."""
    if REAL_DATA:
        import torchvision
        data = torchvision.datasets.CIFAR10(REAL_DATA, train=True).data[:n]
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g) * 255
    return nn.functional.interpolate(small, size=32, mode="bilinear").round().to(torch.uint8)


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
    assert moved[:, :, :8].float().mean((1, 2)).round().tolist() == train_cifar.CIFAR10_MEAN_PIXEL


def recorded_randaugment(monkeypatch, n, **kwargs):
    """Run the CPU RandAugment stage n times, recording (op name, argument) of each applied op."""
    import train_cifar
    calls = []
    recording = [op._replace(apply=lambda x, a, name=op.name: calls.append((name, a)) or x)
                 for op in train_cifar.RANDAUGMENT_OPS]
    monkeypatch.setattr(train_cifar, "RANDAUGMENT_OPS", recording)
    stage = train_cifar.randaugment(train_cifar.parse_args(["--device", "cpu", *kwargs.get("argv", [])]))
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
    fill = train_cifar.CIFAR10_MEAN_PIXEL
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
    ours = augment(images, torch.Generator().manual_seed(2), params)
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
    """A call's cost in launches does not grow with the number of images (README: the count)."""
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


def test_batch_augment_output_statistics_match_the_cpu_path():
    import train_cifar
    images = sample_images(3000)
    torch.manual_seed(0)
    recipe = train_cifar.parse_args(["--device", "cpu"])
    cpu = torch.stack([train_cifar.train_transform(recipe)(im) for im in images])
    gpu = batch_augment()(images, torch.Generator().manual_seed(0))
    for c in range(3):
        assert abs(cpu[:, c].mean() - gpu[:, c].mean()) < 0.05, c
        assert abs(cpu[:, c].std() - gpu[:, c].std()) < 0.05, c
    erased_cpu = (cpu.abs() > 3.5).float().mean()                     # noise beyond any pixel value
    erased_gpu = (gpu.abs() > 3.5).float().mean()
    assert abs(erased_cpu - erased_gpu) < 0.3 * erased_cpu


# ---------------------------------------------------------------------------------------------
# tutorial.ipynb: runs top to bottom on a CPU within its time budget

SECTIONS = ["## 1. The 280-character model", "## 2. The patch embedding", "## 3. Spatial mixing",
            "## 4. Channel mixing", "## 5. Isotropy", "## 6. BatchNorm, GELU",
            "## 7. ConvMixer, ViT and MLP-Mixer", "## 8. A short training run", "## 9. Why ConvMixer is slow"]


def count_figures(notebook):
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def test_committed_tutorial_has_all_sections_and_its_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(HERE / "tutorial.ipynb", as_version=4)
    text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    for section in SECTIONS:
        assert section in text, section
    assert all(cell.outputs for cell in notebook.cells if cell.cell_type == "code")
    assert count_figures(notebook) >= 4


def test_tutorial_executes_within_five_minutes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(HERE / "tutorial.ipynb", as_version=4)
    start = time.time()
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}}).execute()   # raises on error
    assert time.time() - start < 300
    assert count_figures(notebook) >= 4
