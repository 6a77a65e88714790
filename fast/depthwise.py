"""A faster depthwise convolution for ConvMixer's k x k spatial mixing, written in Triton.

Why: PyTorch's native depthwise kernels are slow for large kernels (in locuslab/convmixer issue
#12 the authors call the model "quite slow" and say they are looking into faster large-kernel
depthwise convolutions); `fast/benchmark.py` profiles where a step's GPU time goes. The convolution itself is simple: each output pixel is the sum of k*k input
pixels of the same channel, each times one weight:

    forward     y[b,c,i,j]  = bias[c] + sum_{u,v} w[c,u,v] * x[b,c, i+u-pad, j+v-pad]
    input grad  dx          = the same convolution of dy with the flipped kernel
    weight grad dw[c,u,v]   = sum_{b,i,j} dy[b,c,i,j] * x[b,c, i+u-pad, j+v-pad]

Two algorithms:

- "direct": each program takes one (image, channel) plane (or a tile of it) and applies the
  formula above, k*k shifted loads of the plane (from cache), multiply, add.
- "toeplitz": for each kernel row u, the sum over v along a row is a product with a W x W
  banded (Toeplitz) matrix T_u[j', j] = w[u, j'-j+pad], so a plane is
  y = sum_u shift_u(x) @ T_u: k small matrix products that run on tensor cores. The matrices
  depend only on the channel, so each call builds them once (toeplitz_matrices). A program takes
  the planes of one channel in several images, stacked row after row into one tall tile, so that
  each product covers them all and each T_u is loaded once for the stack. The weight gradient is
  the transposed product shift_u(x)^T @ dy, summed over the stack by the product itself, whose
  diagonals are dw[u, :]; dy is loaded once for all k kernel rows. Used for 9 <= W <= 32 (whole
  rows in one tile; wider tiles spilled registers when compiled), e.g. CIFAR-10 at p = 1
  (32 x 32) or ImageNet at p = 7 and 14.

`use_fast_depthwise(model)` swaps every depthwise nn.Conv2d of a ConvMixer for
FastDepthwiseConv2d, which keeps the same Parameter objects, so `state_dict()` and the optimizer
are unaffected and convmixer.py stays plain PyTorch. Padding is nn.Conv2d's padding="same"
(for even k the extra row/column is at the bottom/right). Accumulation is in float32 whatever the
input dtype. The ops are registered with torch.library, so torch.compile keeps them in its graph.

Tests: tests/test_fast.py compares output and both gradients with nn.Conv2d; on a CPU it runs the
same kernels in Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported).
fast/check_kernels.py compiles the launches below for an H100 on any machine and checks for
spilled registers, shared memory and tensor-core instructions (it runs in the tests too).
"""
import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn


def _blocks(height, width, algorithm):
    """Tile of one program: a whole CIFAR-sized plane, or pieces of bigger ones. "toeplitz"
    keeps whole rows (tl.dot needs sides of at least 16)."""
    if algorithm == "toeplitz":
        return max(16, min(32, triton.next_power_of_2(height))), max(16, triton.next_power_of_2(width))
    return min(32, triton.next_power_of_2(height)), min(64, triton.next_power_of_2(width))


# Wider rows make bigger tiles: compiled for an H100, the float32 kernels spill registers at
# W = 64 and the bfloat16 ones at W = 128 (fast/check_kernels.py); "direct" takes those.
TOEPLITZ_MAX_WIDTH = 32
# "toeplitz" stacks the planes of several images (same channel) into one tile of this many rows
# for 16-bit inputs, so that T_u is loaded once per stack and the weight gradient loads dy once.
# Compiled for an H100: 256 rows take 236 registers a thread in the weight gradient, 128 take 146.
# float32 products do not run on tensor cores, and spill registers with more than 32 rows.
TOEPLITZ_ROWS = 128


def _images_per_program(batch, block_h, dtype):
    rows = TOEPLITZ_ROWS if dtype != torch.float32 else block_h
    return min(triton.next_power_of_2(batch), max(1, rows // block_h))


def _algorithm(width, requested, k=1):
    """"toeplitz" needs whole rows in a tile and the k taps of a kernel row within its width: its
    weight gradient computes dw[u, v] for v < BLOCK_W only."""
    fits = width <= TOEPLITZ_MAX_WIDTH and k <= _blocks(1, width, "toeplitz")[1]
    if requested == "auto":
        return "toeplitz" if 9 <= width and fits else "direct"
    if requested not in ("direct", "toeplitz") or (requested == "toeplitz" and not fits):
        raise ValueError(f"depthwise_conv: algorithm {requested!r} is not 'auto', 'direct' or "
                         f"'toeplitz' (the latter for widths up to {TOEPLITZ_MAX_WIDTH} and kernels "
                         f"no wider than its tile; this is width {width}, kernel {k})")
    return requested


@triton.jit
def _depthwise_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, PAD_T, PAD_L,
                              K: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0)                                   # b * C + c
    c = plane % C
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    x_plane = x_ptr + plane.to(tl.int64) * H * W
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for u in range(K):             # a loop, not unrolled: k*k unrolled loads spill registers
        r = rows + u - PAD_T
        row_ok = (r >= 0) & (r < H)
        for v in tl.static_range(K):
            s = cols + v - PAD_L
            x = tl.load(x_plane + r * W + s, mask=row_ok & (s >= 0) & (s < W), other=0.0)
            acc += x.to(tl.float32) * tl.load(w_ptr + c * K * K + u * K + v).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_plane = y_ptr + plane.to(tl.int64) * H * W
    tl.store(y_plane + rows * W + cols, acc.to(y_ptr.dtype.element_ty), mask=(rows < H) & (cols < W))


@triton.jit
def _depthwise_forward_toeplitz_kernel(x_ptr, t_ptr, b_ptr, y_ptr, B, C, H, W, PAD_T,
                                       K: tl.constexpr, HAS_BIAS: tl.constexpr,
                                       BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                                       IMAGES: tl.constexpr, PRECISION: tl.constexpr):
    c = tl.program_id(0)
    # IMAGES planes of channel c, stacked: row s of the tile is row s % BLOCK_H of image s // BLOCK_H,
    # so that one matrix product per kernel row covers them all and T_u is loaded once for them.
    stack = tl.arange(0, IMAGES * BLOCK_H)[:, None]
    b = tl.program_id(1) * IMAGES + stack // BLOCK_H                     # (IMAGES * BLOCK_H, 1)
    rows = tl.program_id(2) * BLOCK_H + stack % BLOCK_H                  # output rows i
    cols = tl.arange(0, BLOCK_W)[None, :]                                # columns j: whole rows
    src = tl.arange(0, BLOCK_W)[:, None]                                 # input columns j'
    planes = (b * C + c).to(tl.int64) * H * W
    t_channel = t_ptr + c * K * BLOCK_W * BLOCK_W                        # (K, BLOCK_W, BLOCK_W)
    acc = tl.zeros((IMAGES * BLOCK_H, BLOCK_W), dtype=tl.float32)
    for u in tl.static_range(K):
        r = rows + u - PAD_T
        x = tl.load(x_ptr + planes + r * W + cols, mask=(b < B) & (r >= 0) & (r < H) & (cols < W),
                    other=0.0)
        t = tl.load(t_channel + (u * BLOCK_W + src) * BLOCK_W + cols)   # T_u, zero-padded
        acc = tl.dot(x, t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    tl.store(y_ptr + planes + rows * W + cols, acc.to(y_ptr.dtype.element_ty),
             mask=(b < B) & (rows < H) & (cols < W))


@triton.jit
def _depthwise_weight_grad_kernel(x_ptr, dy_ptr, partial_ptr, B, C, H, W, PAD_T, PAD_L, B_CHUNK,
                                  K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    c = tl.program_id(0)
    chunk = tl.program_id(1)                                   # which B_CHUNK images
    tile = tl.program_id(2)                                    # which BLOCK_H x BLOCK_W tile
    tiles_w = tl.cdiv(W, BLOCK_W)
    rows = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < H) & (cols < W)
    first = chunk * B_CHUNK
    last = tl.minimum(first + B_CHUNK, B)
    out = partial_ptr + ((chunk * tl.num_programs(2) + tile) * C + c).to(tl.int64) * K * K
    for u in tl.static_range(K):
        r = rows + u - PAD_T
        row_ok = (r >= 0) & (r < H)
        for v in tl.static_range(K):
            s = cols + v - PAD_L
            ok = row_ok & (s >= 0) & (s < W) & inside
            acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
            for b in range(first, last):
                offset = (b * C + c).to(tl.int64) * H * W
                dy = tl.load(dy_ptr + offset + rows * W + cols, mask=inside, other=0.0)
                x = tl.load(x_ptr + offset + r * W + s, mask=ok, other=0.0)
                acc += dy.to(tl.float32) * x.to(tl.float32)
            tl.store(out + u * K + v, tl.sum(acc))


@triton.jit
def _depthwise_weight_grad_toeplitz_kernel(x_ptr, dy_ptr, partial_ptr, B, C, H, W, PAD_T, PAD_L,
                                           K: tl.constexpr, BLOCK_H: tl.constexpr,
                                           BLOCK_W: tl.constexpr, IMAGES: tl.constexpr,
                                           PRECISION: tl.constexpr):
    c = tl.program_id(0)
    chunk = tl.program_id(1)                                   # which IMAGES images
    tile = tl.program_id(2)                                    # which BLOCK_H rows
    stack = tl.arange(0, IMAGES * BLOCK_H)[:, None]            # stacked planes, as in the forward
    b = chunk * IMAGES + stack // BLOCK_H
    rows = tile * BLOCK_H + stack % BLOCK_H
    cols = tl.arange(0, BLOCK_W)[None, :]
    src = tl.arange(0, BLOCK_W)[:, None]
    planes = (b * C + c).to(tl.int64) * H * W
    dy = tl.load(dy_ptr + planes + rows * W + cols, mask=(b < B) & (rows < H) & (cols < W), other=0.0)
    out = partial_ptr + ((chunk * tl.num_programs(2) + tile) * C + c).to(tl.int64) * K * K
    for u in tl.static_range(K):                               # dy stays loaded for every kernel row
        r = rows + u - PAD_T
        x = tl.load(x_ptr + planes + r * W + cols, mask=(b < B) & (r >= 0) & (r < H) & (cols < W),
                    other=0.0)
        # m[j', j] = sum over the stacked images and rows i of x[i+u-pad, j'] dy[i, j]: one product.
        m = tl.dot(tl.trans(x), dy.to(x.dtype), input_precision=PRECISION)
        # dw[u, v] is the sum of m's diagonal j' - j = v - pad: gather it into row v, then add up.
        diagonal = cols + src - PAD_L                          # [v, j] -> j' = j + v - pad
        on = (src < K) & (diagonal >= 0) & (diagonal < BLOCK_W)
        skewed = tl.gather(m, tl.where(on, diagonal, 0), axis=0)   # skewed[v, j] = m[j + v - pad, j]
        dw_u = tl.sum(tl.where(on, skewed, 0.0), axis=1)           # (BLOCK_W,): dw[u, v] for v < K
        v = tl.arange(0, BLOCK_W)
        tl.store(out + u * K + v, dw_u, mask=v < K)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"          # exact float32; bf16/fp16 ignore it


@functools.lru_cache(maxsize=None)
def _band_index(block_w, pad_left, k, device):
    """(block_w, block_w) index into a kernel row extended by one zero tap: [j', j] -> the tap
    j' - j + pad_left when it is one of the k taps, else k (the zero)."""
    j = torch.arange(block_w, device=device)
    d = j[:, None] - j[None, :] + pad_left
    return torch.where((d >= 0) & (d < k), d, k)


def toeplitz_matrices(weight, pad_left, block_w, dtype):
    """The banded matrices of "toeplitz", zero-padded to block_w: (C, k, block_w, block_w) with
    T[c, u, j', j] = weight[c, 0, u, j' - j + pad_left] where that index lies in 0..k-1, else 0.
    They depend on the channel only, so they are built once per call, not once per image."""
    C, _, k, _ = weight.shape
    taps = torch.cat([weight[:, 0], weight.new_zeros(C, k, 1)], dim=-1)      # (C, k, k + 1)
    return taps[:, :, _band_index(block_w, pad_left, k, weight.device)].to(dtype)


def forward_launch(x, weight, bias, y, pad_top, pad_left, algorithm):
    """(kernel, grid, args, constexprs) that compute y = depthwise_conv(x) (fast/check_kernels.py
    compiles the same launches for an H100)."""
    B, C, H, W = x.shape
    K = weight.shape[-1]
    algorithm = _algorithm(W, algorithm, K)
    block_h, block_w = _blocks(H, W, algorithm)
    bias_or_any = bias if bias is not None else weight          # not read when HAS_BIAS is False
    meta = dict(K=K, HAS_BIAS=bias is not None, BLOCK_H=block_h, BLOCK_W=block_w)
    if algorithm == "toeplitz":
        images = _images_per_program(B, block_h, x.dtype)
        grid = (C, triton.cdiv(B, images), triton.cdiv(H, block_h))
        t = toeplitz_matrices(weight, pad_left, block_w, x.dtype)
        return (_depthwise_forward_toeplitz_kernel, grid, (x, t, bias_or_any, y, B, C, H, W, pad_top),
                meta | dict(IMAGES=images, PRECISION=_precision(x.dtype)))
    grid = (B * C, triton.cdiv(H, block_h), triton.cdiv(W, block_w))
    return (_depthwise_forward_kernel, grid, (x, weight, bias_or_any, y, C, H, W, pad_top, pad_left),
            meta)


def weight_grad_launch(x, grad_y, partial, kernel_size, pad_top, pad_left, algorithm, batch_chunk):
    """(kernel, grid, args, constexprs) that write the weight gradient's partial sums; `partial`
    is (partial_rows(...), C, k*k) float32."""
    B, C, H, W = x.shape
    algorithm = _algorithm(W, algorithm, kernel_size)
    block_h, block_w = _blocks(H, W, algorithm)
    meta = dict(K=kernel_size, BLOCK_H=block_h, BLOCK_W=block_w)
    if algorithm == "toeplitz":
        images = _images_per_program(B, block_h, x.dtype)
        grid = (C, triton.cdiv(B, images), triton.cdiv(H, block_h))
        return (_depthwise_weight_grad_toeplitz_kernel, grid,
                (x, grad_y, partial, B, C, H, W, pad_top, pad_left),
                meta | dict(IMAGES=images, PRECISION=_precision(x.dtype)))
    grid = (C, triton.cdiv(B, batch_chunk), triton.cdiv(H, block_h) * triton.cdiv(W, block_w))
    return (_depthwise_weight_grad_kernel, grid,
            (x, grad_y, partial, B, C, H, W, pad_top, pad_left, batch_chunk), meta)


def partial_rows(shape, dtype, algorithm, batch_chunk, k):
    """How many partial sums of the weight gradient each channel gets: one per program.
    ("direct" takes batch_chunk images a program, "toeplitz" a stack of _images_per_program.)"""
    B, C, H, W = shape
    algorithm = _algorithm(W, algorithm, k)
    block_h, block_w = _blocks(H, W, algorithm)
    if algorithm == "toeplitz":
        batch_chunk = _images_per_program(B, block_h, dtype)
    return triton.cdiv(B, batch_chunk) * triton.cdiv(H, block_h) * triton.cdiv(W, block_w)


@torch.library.custom_op("convmixer::depthwise_conv", mutates_args=())
def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   pad_top: int, pad_left: int, algorithm: str = "auto") -> torch.Tensor:
    """Stride-1 depthwise convolution of x (B, C, H, W) with weight (C, 1, k, k), zero padding
    pad_top/pad_left before the image (and k-1-pad after it); output (B, C, H, W), x's dtype."""
    x = x.contiguous()
    y = torch.empty_like(x)
    kernel, grid, args, meta = forward_launch(x, weight.contiguous(), bias, y, pad_top, pad_left,
                                              algorithm)
    with on_device_of(x):
        kernel[grid](*args, **meta)
    return y


def on_device_of(x):
    """Triton launches on the current CUDA device: enter x's (cuda:1, say) for the launch."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@depthwise_conv.register_fake
def _(x, weight, bias, pad_top, pad_left, algorithm="auto"):
    return torch.empty_like(x)


@torch.library.custom_op("convmixer::depthwise_conv_weight_grad", mutates_args=())
def depthwise_conv_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, kernel_size: int,
                               pad_top: int, pad_left: int, algorithm: str = "auto",
                               batch_chunk: int = 16) -> torch.Tensor:
    """d(loss)/d(weight), float32 (C, 1, k, k): per-program partial sums, then one small sum."""
    x, grad_y = x.contiguous(), grad_y.contiguous()
    C = x.shape[1]
    partial = torch.empty(partial_rows(x.shape, x.dtype, algorithm, batch_chunk, kernel_size), C,
                          kernel_size * kernel_size, device=x.device, dtype=torch.float32)
    kernel, grid, args, meta = weight_grad_launch(x, grad_y, partial, kernel_size, pad_top,
                                                  pad_left, algorithm, batch_chunk)
    with on_device_of(x):
        kernel[grid](*args, **meta)
    return partial.sum(0).view(C, 1, kernel_size, kernel_size)


@depthwise_conv_weight_grad.register_fake
def _(x, grad_y, kernel_size, pad_top, pad_left, algorithm="auto", batch_chunk=16):
    return x.new_empty(x.shape[1], 1, kernel_size, kernel_size, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, pad_top, pad_left, algorithm = inputs
    ctx.save_for_backward(x, weight)
    ctx.pads = pad_top, pad_left
    ctx.algorithm = algorithm
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    pad_top, pad_left = ctx.pads
    k = weight.shape[-1]
    # dx: correlate dy with the kernel turned by 180 degrees; the padding swaps sides.
    grad_x = depthwise_conv(grad_y, weight.flip(-1, -2), None, k - 1 - pad_top, k - 1 - pad_left,
                            ctx.algorithm)
    grad_w = depthwise_conv_weight_grad(x, grad_y, k, pad_top, pad_left, ctx.algorithm).to(weight.dtype)
    grad_b = grad_y.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, None, None, None


depthwise_conv.register_autograd(_backward, setup_context=_setup_context)


def is_same_depthwise(conv: nn.Module) -> bool:
    """Whether `conv` is what ConvMixer uses: a square, stride-1, zero-"same"-padded depthwise conv."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding == "same" and conv.padding_mode == "zeros")


class FastDepthwiseConv2d(nn.Module):
    """nn.Conv2d(dim, dim, k, groups=dim, padding="same") computed by the Triton kernels above.
    Built from such a conv, it shares its weight and bias Parameters. `algorithm`: "auto",
    "direct" or "toeplitz" (see the top of this file)."""

    def __init__(self, conv: nn.Conv2d, algorithm: str = "auto"):
        super().__init__()
        if not is_same_depthwise(conv):
            raise ValueError(f"FastDepthwiseConv2d: {conv} is not a stride-1 'same' depthwise conv")
        k = conv.kernel_size[0]
        self.weight, self.bias = conv.weight, conv.bias
        self.pad = (k - 1) // 2                  # nn.Conv2d's "same": extra padding after the image
        self.algorithm = algorithm

    def forward(self, x):
        device = x.device.type
        if torch.is_autocast_enabled(device):    # what autocast would do for nn.Conv2d's input
            x = x.to(torch.get_autocast_dtype(device))
        return depthwise_conv(x, self.weight, self.bias, self.pad, self.pad, self.algorithm)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, kernel_size={self.weight.shape[-1]}, padding='same'"


def use_fast_depthwise(model: nn.Module) -> nn.Module:
    """Replace, in place, every depthwise 'same' nn.Conv2d inside `model` by FastDepthwiseConv2d."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if is_same_depthwise(child):
                setattr(parent, name, FastDepthwiseConv2d(child))
    return model


def check_against_conv2d(conv: nn.Conv2d, shape, amp, tolerance=3e-2) -> Optional[str]:
    """None if FastDepthwiseConv2d(conv) computes what conv computes on a random input of `shape`
    on conv's device (forward, input and weight gradients, autocast to `amp`, None: float32); else
    which of them differs, and by how much relative to its largest value. The tolerance separates
    a wrong kernel from 16-bit rounding; train_cifar runs this before --fast takes the kernels."""
    device = conv.weight.device
    x = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(0), requires_grad=True)
    results = []
    for layer in (conv, FastDepthwiseConv2d(conv)):
        with torch.autocast(device.type, amp, enabled=amp is not None):
            y = layer(x)
        dy = torch.randn(y.shape, device=device, generator=torch.Generator(device).manual_seed(1)).to(y.dtype)
        results.append((y, *torch.autograd.grad(y, (x, conv.weight), dy)))
    for name, reference, fast in zip(("output", "input gradient", "weight gradient"), *results):
        error = ((fast.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
        if not error <= tolerance:                        # a nan fails too
            return f"{name} off by {error:.1e} of its largest value"
    return None
