"""GELU followed by BatchNorm2d, as ConvMixer applies them after every convolution, and the skip
connection's addition that follows in each block's first half, in Triton kernels.

Why: on an H200, with the depthwise convolution in Triton, BatchNorm's native kernels took 46% of
a --fast training step's GPU time at batch 512 and GELU's another 10%
(results/benchmark_256_8_k9_p1/). Each of those kernels reads a whole activation from memory and
most write one. Fused, with g = GELU(z) recomputed from z wherever it is needed, and x the block's
input where it is added back:

    forward   statistics  read z       per (image, channel) plane: the mean of g, and the sum of
                                       squared deviations from it
              channels    (B, C) sums  per channel: the batch's mean and variance of g (Chan et
                                       al.'s formula, no cancellation), scale = weight / std
              normalize   read z (x)   y = (g - mean) * scale + bias (+ x), write y
              running     (C,)         the running mean and variance, num_batches_tracked
    backward  sums        read z, dy   per plane: sum(dy), sum(dy * (g - mean))
              channels    (B, C) sums  per channel: a, b, d below, the weight and bias gradients
              input grad  read z, dy   dz = GELU'(z) * (a * dy + b * (g - mean) + d), write dz

The unfused pair reads z, writes g, reads g twice and writes y in the forward pass, then the
addition reads y and x and writes their sum; it keeps both z and g for the backward pass. The
fused op keeps z only. g is rounded to z's dtype before it is used, as GELU's own output would be,
so the statistics are those of the tensor BatchNorm would see. The skip connection passes the
output's gradient back unchanged; autograd adds it to the one through the convolution, as it does
for the unfused addition. The per-channel steps are small kernels of their own: done with PyTorch
ops, as in this module's first version, they took 29 launches a layer, forward and backward
(counted with torch.profiler), and a launch costs the same at any batch size, so they weigh most
at the paper's batch of 64.

In training mode FusedGeluBatchNorm2d computes the batch statistics and updates the running ones
as nn.BatchNorm2d does (momentum, unbiased running variance, num_batches_tracked); in eval mode it
calls F.gelu and F.batch_norm. `use_fused_gelu_batch_norm(model)` swaps it in place of every
GELU -> BatchNorm2d pair of an nn.Sequential: the GELU becomes nn.Identity and the BatchNorm2d a
FusedGeluBatchNorm2d holding the same Parameters and buffers under the same names, so the
state_dict and the optimizer are unaffected; a Residual whose body ends in such a pair becomes a
FusedResidual, which passes its input to the normalize kernel to be added there. The ops are
registered with torch.library, so torch.compile keeps them in its graph and a CUDA graph can
capture them.

Tests: test_convmixer.py checks output, running statistics and the three gradients (four with the
skip connection) against F.gelu + nn.BatchNorm2d (+ x), on a CPU in Triton's interpreter and on a
GPU in bfloat16 autocast; fast/check_kernels.py compiles the kernels for an H100. train_cifar.py
takes it with --fused-norm (opt-in). Not yet part of --fast: that waits for its GPU tests
(tools/gpu_check.sh tests), its speed (python fast/benchmark.py --fused-norm) and a 25-epoch
CIFAR-10 run with it.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

from convmixer import Residual

# Constants a Triton kernel may read must be tl.constexpr objects.
SQRT1_2 = tl.constexpr(0.7071067811865476)          # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)     # 1 / sqrt(2 pi)


@triton.jit
def _load_gelu(z_plane, offs, HW):
    """z (float32) and g = GELU(z), exact (erf) as nn.GELU(), rounded to z's dtype as nn.GELU's
    output is. Outside the plane z = 0, so g = 0 there and sums need no mask."""
    z = tl.load(z_plane + offs, mask=offs < HW, other=0.0).to(tl.float32)
    g = 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
    return z, g.to(z_plane.dtype.element_ty).to(tl.float32)


@triton.jit
def _plane_stats_kernel(z_ptr, mean_ptr, m2_ptr, HW, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)                          # b * C + c
    z_plane = z_ptr + plane * HW
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        _, g = _load_gelu(z_plane, start + tl.arange(0, BLOCK), HW)
        total += g
    mean = tl.sum(total, axis=0) / HW
    m2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, HW, BLOCK):                              # again: from cache, a plane is small
        offs = start + tl.arange(0, BLOCK)
        _, g = _load_gelu(z_plane, offs, HW)
        deviation = tl.where(offs < HW, g - mean, 0.0)
        m2 += deviation * deviation
    tl.store(mean_ptr + plane, mean)
    tl.store(m2_ptr + plane, tl.sum(m2, axis=0))


@triton.jit
def _load_planes(ptr, start, cs, B, C, BLOCK_B: tl.constexpr):
    """(BLOCK_B, BLOCK_C) values of a (B, C) float32 array: images start.., channels cs; 0 outside."""
    bs = start + tl.arange(0, BLOCK_B)[:, None]
    return tl.load(ptr + bs * C + cs[None, :], mask=(bs < B) & (cs[None, :] < C), other=0.0)


@triton.jit
def _channel_stats_kernel(plane_mean_ptr, plane_m2_ptr, weight_ptr, eps, mean_ptr, var_ptr, scale_ptr,
                          B, C, HW, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    # The planes have the same size, so the batch's mean is the mean of their means, and the squared
    # deviations add up once each plane's offset from that mean is counted (Chan et al.).
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        total += _load_planes(plane_mean_ptr, start, cs, B, C, BLOCK_B)
    mean = tl.sum(total, axis=0) / B
    m2 = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for start in range(0, B, BLOCK_B):                             # again: from cache
        plane_mean = _load_planes(plane_mean_ptr, start, cs, B, C, BLOCK_B)
        offset = tl.where(start + tl.arange(0, BLOCK_B)[:, None] < B, plane_mean - mean[None, :], 0.0)
        m2 += _load_planes(plane_m2_ptr, start, cs, B, C, BLOCK_B) + HW * offset * offset
    var = tl.sum(m2, axis=0) / B / HW                              # biased, as BatchNorm normalizes
    weight = tl.load(weight_ptr + cs, mask=cs < C, other=0.0).to(tl.float32)
    tl.store(mean_ptr + cs, mean, mask=cs < C)
    tl.store(var_ptr + cs, var, mask=cs < C)
    tl.store(scale_ptr + cs, weight * tl.math.rsqrt(var + eps), mask=cs < C)


@triton.jit
def _normalize_kernel(z_ptr, mean_ptr, scale_ptr, bias_ptr, residual_ptr, y_ptr, C, HW,
                      HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    c = plane % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    base = plane.to(tl.int64) * HW
    _, g = _load_gelu(z_ptr + base, offs, HW)
    y = (g - tl.load(mean_ptr + c)) * tl.load(scale_ptr + c) + tl.load(bias_ptr + c).to(tl.float32)
    if HAS_RESIDUAL:                                               # the skip connection: x + ...
        y += tl.load(residual_ptr + base + offs, mask=offs < HW, other=0.0).to(tl.float32)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=offs < HW)


@triton.jit
def _running_stats_kernel(running_mean_ptr, running_var_ptr, count_ptr, mean_ptr, var_ptr, momentum,
                          unbias, C, BLOCK_C: tl.constexpr):
    # As nn.BatchNorm2d: running += momentum * (batch - running), the variance made unbiased first.
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cs < C
    running_mean = tl.load(running_mean_ptr + cs, mask=ok).to(tl.float32)
    running_var = tl.load(running_var_ptr + cs, mask=ok).to(tl.float32)
    running_mean += momentum * (tl.load(mean_ptr + cs, mask=ok) - running_mean)
    running_var += momentum * (tl.load(var_ptr + cs, mask=ok) * unbias - running_var)
    tl.store(running_mean_ptr + cs, running_mean.to(running_mean_ptr.dtype.element_ty), mask=ok)
    tl.store(running_var_ptr + cs, running_var.to(running_var_ptr.dtype.element_ty), mask=ok)
    if tl.program_id(0) == 0:
        tl.store(count_ptr, tl.load(count_ptr) + 1)


@triton.jit
def _grad_sums_kernel(z_ptr, dy_ptr, mean_ptr, sum_dy_ptr, sum_dy_xc_ptr, C, HW, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + plane % C)
    sum_dy = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_dy_xc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        _, g = _load_gelu(z_ptr + plane * HW, offs, HW)
        dy = tl.load(dy_ptr + plane * HW + offs, mask=offs < HW, other=0.0).to(tl.float32)
        sum_dy += dy
        sum_dy_xc += dy * (g - mean)                               # dy = 0 outside the plane
    tl.store(sum_dy_ptr + plane, tl.sum(sum_dy, axis=0))
    tl.store(sum_dy_xc_ptr + plane, tl.sum(sum_dy_xc, axis=0))


@triton.jit
def _grad_coefficients_kernel(sum_dy_ptr, sum_dy_xc_ptr, weight_ptr, var_ptr, eps, n, a_ptr, b_ptr, d_ptr,
                              grad_weight_ptr, grad_bias_ptr, B, C,
                              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    # With x = (g - mean) * rstd, rstd = 1 / sqrt(var + eps), over the n values of a channel:
    #   d bias   = sum(dy)                 d weight = sum(dy * x) = rstd * sum(dy * (g - mean))
    #   dg       = weight * rstd * (dy - d bias / n - x * d weight / n)
    #            = a * dy + b * (g - mean) + d,   a = weight * rstd,
    #              b = -weight * rstd^3 * sum(dy * (g - mean)) / n,   d = -weight * rstd * sum(dy) / n
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    sum_dy = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    sum_dy_xc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        sum_dy += _load_planes(sum_dy_ptr, start, cs, B, C, BLOCK_B)
        sum_dy_xc += _load_planes(sum_dy_xc_ptr, start, cs, B, C, BLOCK_B)
    sum_dy, sum_dy_xc = tl.sum(sum_dy, axis=0), tl.sum(sum_dy_xc, axis=0)
    ok = cs < C
    rstd = tl.math.rsqrt(tl.load(var_ptr + cs, mask=ok, other=1.0) + eps)
    a = tl.load(weight_ptr + cs, mask=ok, other=0.0).to(tl.float32) * rstd
    tl.store(a_ptr + cs, a, mask=ok)
    tl.store(b_ptr + cs, -a * rstd * rstd * sum_dy_xc / n, mask=ok)
    tl.store(d_ptr + cs, -a * sum_dy / n, mask=ok)
    tl.store(grad_weight_ptr + cs, (rstd * sum_dy_xc).to(grad_weight_ptr.dtype.element_ty), mask=ok)
    tl.store(grad_bias_ptr + cs, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_input_kernel(z_ptr, dy_ptr, mean_ptr, a_ptr, b_ptr, d_ptr, dz_ptr, C, HW, BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    c = plane % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    base = plane.to(tl.int64) * HW
    z, g = _load_gelu(z_ptr + base, offs, HW)
    dy = tl.load(dy_ptr + base + offs, mask=offs < HW, other=0.0).to(tl.float32)
    dg = tl.load(a_ptr + c) * dy + tl.load(b_ptr + c) * (g - tl.load(mean_ptr + c)) + tl.load(d_ptr + c)
    gelu_slope = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2)) + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    tl.store(dz_ptr + base + offs, (dg * gelu_slope).to(dz_ptr.dtype.element_ty), mask=offs < HW)


def _block(hw):
    """Elements of a plane one program takes at a time: a whole CIFAR-10 plane (32 x 32) at once."""
    return max(16, min(triton.next_power_of_2(hw), 1024))


# The per-channel kernels reduce (B, C) per-plane sums over the batch, taking this many images at a
# time (the whole batch, up to 512) times 4,096 / that many channels: a program's tile stays in its
# registers, and a batch of 512 with 256 channels is spread over 32 programs.
CHANNEL_BLOCK_IMAGES = 512


def _channel_blocks(batch, channels):
    block_b = min(triton.next_power_of_2(batch), CHANNEL_BLOCK_IMAGES)
    return block_b, min(triton.next_power_of_2(channels), 4096 // block_b)


# Each returns (kernel, grid, args, constexprs); fast/check_kernels.py compiles the same launches.
def stats_launch(z, plane_mean, plane_m2):
    B, C, H, W = z.shape
    return _plane_stats_kernel, (B * C,), (z, plane_mean, plane_m2, H * W), dict(BLOCK=_block(H * W))


def channel_stats_launch(plane_mean, plane_m2, weight, eps, mean, var, scale, plane_size):
    B, C = plane_mean.shape
    block_b, block_c = _channel_blocks(B, C)
    return (_channel_stats_kernel, (triton.cdiv(C, block_c),),
            (plane_mean, plane_m2, weight, eps, mean, var, scale, B, C, plane_size),
            dict(BLOCK_B=block_b, BLOCK_C=block_c))


def normalize_launch(z, mean, scale, bias, residual, y):
    """residual None: y = BatchNorm(GELU(z)); else residual + that."""
    B, C, H, W = z.shape
    block = _block(H * W)
    return (_normalize_kernel, (B * C, triton.cdiv(H * W, block)),
            (z, mean, scale, bias, y if residual is None else residual, y, C, H * W),
            dict(HAS_RESIDUAL=residual is not None, BLOCK=block))


def running_stats_launch(running_mean, running_var, count, mean, var, momentum, unbias):
    C = mean.shape[0]
    block_c = min(triton.next_power_of_2(C), 1024)
    return (_running_stats_kernel, (triton.cdiv(C, block_c),),
            (running_mean, running_var, count, mean, var, momentum, unbias, C), dict(BLOCK_C=block_c))


def grad_sums_launch(z, dy, mean, sum_dy, sum_dy_xc):
    B, C, H, W = z.shape
    return (_grad_sums_kernel, (B * C,), (z, dy, mean, sum_dy, sum_dy_xc, C, H * W),
            dict(BLOCK=_block(H * W)))


def grad_coefficients_launch(sum_dy, sum_dy_xc, weight, var, eps, n, a, b, d, grad_weight, grad_bias):
    B, C = sum_dy.shape
    block_b, block_c = _channel_blocks(B, C)
    return (_grad_coefficients_kernel, (triton.cdiv(C, block_c),),
            (sum_dy, sum_dy_xc, weight, var, eps, float(n), a, b, d, grad_weight, grad_bias, B, C),
            dict(BLOCK_B=block_b, BLOCK_C=block_c))


def grad_input_launch(z, dy, mean, a, b, d, dz):
    B, C, H, W = z.shape
    block = _block(H * W)
    return (_grad_input_kernel, (B * C, triton.cdiv(H * W, block)), (z, dy, mean, a, b, d, dz, C, H * W),
            dict(BLOCK=block))


def _run(launch):
    kernel, grid, args, meta = launch
    kernel[grid](*args, **meta)


def _three_per_channel(z):
    """Three float32 (C,) tensors for z (B, C, H, W): each its own, as the ops may return them."""
    return [torch.empty(z.shape[1], device=z.device, dtype=torch.float32) for _ in range(3)]


def _output_dtype(z, residual):
    if residual is None:
        return z.dtype
    if residual.shape != z.shape:
        raise ValueError(f"gelu_batch_norm: residual of shape {tuple(residual.shape)} for an input of "
                         f"shape {tuple(z.shape)}; they must be the same")
    return torch.promote_types(z.dtype, residual.dtype)


@torch.library.custom_op("convmixer::gelu_batch_norm", mutates_args=())
def gelu_batch_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    residual: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm2d(GELU(z)) of z (B, C, H, W), plus `residual` (same shape) if given:
    y in z's dtype (promoted with residual's), and the batch's per-channel mean and biased variance
    of GELU(z), float32 (C,)."""
    z = z.contiguous()
    B, C, H, W = z.shape
    plane_mean, plane_m2 = torch.empty(2, B, C, device=z.device, dtype=torch.float32)
    _run(stats_launch(z, plane_mean, plane_m2))
    mean, var, scale = _three_per_channel(z)
    _run(channel_stats_launch(plane_mean, plane_m2, weight, eps, mean, var, scale, H * W))
    if residual is not None:
        residual = residual.contiguous()
    y = torch.empty_like(z, dtype=_output_dtype(z, residual))
    _run(normalize_launch(z, mean, scale, bias, residual, y))
    return y, mean, var


@gelu_batch_norm.register_fake
def _(z, weight, bias, eps, residual=None):
    C = z.shape[1]
    return (torch.empty_like(z, dtype=_output_dtype(z, residual)), z.new_empty(C, dtype=torch.float32),
            z.new_empty(C, dtype=torch.float32))


@torch.library.custom_op("convmixer::update_running_statistics",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def update_running_statistics(running_mean: torch.Tensor, running_var: torch.Tensor,
                              num_batches_tracked: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                              momentum: float, unbias: float) -> None:
    """BatchNorm's running statistics, in place, from a batch's mean and biased variance; unbias is
    n / (n - 1) for the n values of a channel."""
    _run(running_stats_launch(running_mean, running_var, num_batches_tracked, mean, var, momentum, unbias))


@update_running_statistics.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, momentum, unbias):
    return None


@torch.library.custom_op("convmixer::gelu_batch_norm_backward", mutates_args=())
def gelu_batch_norm_backward(dy: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                             var: torch.Tensor, eps: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz in z's dtype, d weight, d bias in weight's dtype) for gelu_batch_norm's output gradient dy."""
    z, dy = z.contiguous(), dy.contiguous()
    B, C, H, W = z.shape
    sum_dy, sum_dy_xc = torch.empty(2, B, C, device=z.device, dtype=torch.float32)
    _run(grad_sums_launch(z, dy, mean, sum_dy, sum_dy_xc))
    a, b, d = _three_per_channel(z)
    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(weight)
    _run(grad_coefficients_launch(sum_dy, sum_dy_xc, weight, var, eps, B * H * W, a, b, d,
                                  grad_weight, grad_bias))
    dz = torch.empty_like(z)
    _run(grad_input_launch(z, dy, mean, a, b, d, dz))
    return dz, grad_weight, grad_bias


@gelu_batch_norm_backward.register_fake
def _(dy, z, weight, mean, var, eps):
    return torch.empty_like(z), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    z, weight, _, eps, residual = inputs
    _, mean, var = output
    ctx.save_for_backward(z, weight, mean, var)
    ctx.eps = eps
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.mark_non_differentiable(mean, var)          # they only feed the running statistics


def _backward(ctx, dy, _grad_mean, _grad_var):
    z, weight, mean, var = ctx.saved_tensors
    dz, grad_weight, grad_bias = gelu_batch_norm_backward(dy, z, weight, mean, var, ctx.eps)
    # y = x + ...: the skip connection passes the output's gradient on as it is.
    grad_residual = None if ctx.residual_dtype is None else dy.to(ctx.residual_dtype)
    return dz, grad_weight, grad_bias, None, grad_residual


gelu_batch_norm.register_autograd(_backward, setup_context=_setup_context)


def is_fusable(activation: nn.Module, norm: nn.Module) -> bool:
    """Whether (activation, norm) is ConvMixer's pair: exact GELU, then a BatchNorm2d with affine
    parameters, running statistics and a momentum (not a cumulative average)."""
    return (type(activation) is nn.GELU and activation.approximate == "none" and type(norm) is nn.BatchNorm2d
            and norm.affine and norm.track_running_stats and norm.momentum is not None)


class FusedGeluBatchNorm2d(nn.Module):
    """nn.BatchNorm2d(nn.GELU()(z)) computed by the kernels above in training mode. Built from the
    BatchNorm2d, it holds that module's Parameters and buffers (the same tensors)."""

    def __init__(self, norm: nn.BatchNorm2d):
        super().__init__()
        if not is_fusable(nn.GELU(), norm):
            raise ValueError(f"FusedGeluBatchNorm2d: {norm} is not an affine BatchNorm2d with running "
                             f"statistics and a momentum")
        self.weight, self.bias = norm.weight, norm.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(norm, name))
        self.eps, self.momentum = norm.eps, norm.momentum

    def forward(self, z, residual=None):
        """BatchNorm2d(GELU(z)), plus residual (z's shape) if given."""
        if not self.training:                        # evaluation: the running statistics, unfused
            y = F.batch_norm(F.gelu(z), self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps)
            return y if residual is None else y + residual
        n = z.numel() // z.shape[1]                   # values per channel
        if n < 2:
            raise ValueError(f"FusedGeluBatchNorm2d: training needs more than 1 value per channel, "
                             f"got input of shape {tuple(z.shape)}")
        y, mean, var = gelu_batch_norm(z, self.weight, self.bias, self.eps, residual)
        update_running_statistics(self.running_mean, self.running_var, self.num_batches_tracked, mean, var,
                                  self.momentum, n / (n - 1))
        return y

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum} (GELU fused in)"


class FusedResidual(Residual):
    """Residual(fn) for an fn (an nn.Sequential) that ends in a FusedGeluBatchNorm2d: fn(x) + x with
    the addition done by that module's normalize kernel. Same attribute, so the same state_dict keys."""

    def forward(self, x):
        *body, norm = self.fn
        z = x
        for layer in body:
            z = layer(z)
        return norm(z, residual=x)


def use_fused_gelu_batch_norm(model: nn.Module) -> nn.Module:
    """Replace, in place, every GELU -> BatchNorm2d pair of an nn.Sequential inside `model` by
    nn.Identity -> FusedGeluBatchNorm2d (same index, so the same state_dict keys), then every
    Residual whose nn.Sequential ends in one by a FusedResidual of the same body."""
    sequences = [m for m in model.modules() if isinstance(m, nn.Sequential)]
    for sequence in sequences:
        for i in range(len(sequence) - 1):
            if is_fusable(sequence[i], sequence[i + 1]):
                sequence[i], sequence[i + 1] = nn.Identity(), FusedGeluBatchNorm2d(sequence[i + 1])
    for sequence in sequences:
        for i, layer in enumerate(sequence):
            if (type(layer) is Residual and isinstance(layer.fn, nn.Sequential) and len(layer.fn)
                    and isinstance(layer.fn[-1], FusedGeluBatchNorm2d)):
                sequence[i] = FusedResidual(layer.fn)
    return model
