"""The tests of convmixer.py, readable as the model's specification: its layout, shapes and
parameter counts against the paper's and timm's, the published state_dict keys both ways, and the
released weights (pretrained=True, torch.hub) with local files standing in for the downloads.

    pytest -q                   # the quick check: these, and the fast tests of tests/
    pytest -q -m ""             # the full suite (README, "Tests")

The tests of the trainer, the fast path, the tools and the notebook are in tests/.
"""
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import convmixer
from convmixer import ConvMixer, Residual, from_timm, to_timm
from helpers import REAL_DATA, storage_locations          # tests/helpers.py

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


@pytest.mark.slow
def test_readme_pretrained_snippets_run_as_written(tmp_path, monkeypatch):
    """The pretrained snippets of the README and docs/model.md, with local files standing in for the
    three downloads."""
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
    pages = [(HERE / name).read_text() for name in ("README.md", "docs/model.md")]
    readme, model_page = (re.findall(r"```python\n(.*?)```", page, re.S) for page in pages)
    assert readme[1] in model_page                           # the page repeats the README's CIFAR-10 one
    snippets = [block for block in model_page if "pretrained=True" in block]
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
