"""GELU followed by BatchNorm2d, as ConvMixer applies them after every convolution, in four Triton
kernels: two for the forward pass and two for the backward pass.

Why: on an H200, with the depthwise convolution in Triton, BatchNorm's native kernels took 46% of
a --fast training step's GPU time at batch 512 and GELU's another 10%
(results/benchmark_256_8_k9_p1/). Each of those kernels reads a whole activation from memory and
most write one. Fused, with g = GELU(z) recomputed from z wherever it is needed:

    forward   statistics  read z       per (image, channel) plane: the mean of g, and the sum of
                                       squared deviations from it; combined per channel (Chan et
                                       al.'s formula, no cancellation) into the batch's mean, var
              normalize   read z       y = (g - mean) * weight / sqrt(var + eps) + bias, write y
    backward  sums        read z, dy   per plane: sum(dy), sum(dy * (g - mean))
              input grad  read z, dy   dz = GELU'(z) * (a * dy + b * (g - mean) + d), write dz,
                                       with a, b, d per channel from the sums (BatchNorm's
                                       gradient formula, worked out below in backward_coefficients)

The unfused pair reads z, writes g, reads g twice and writes y in the forward pass, and keeps both
z and g for the backward pass; the fused op keeps z only. g is rounded to z's dtype before it is
used, as GELU's own output would be, so the statistics are those of the tensor BatchNorm would see.

In training mode FusedGeluBatchNorm2d computes the batch statistics and updates the running ones
as nn.BatchNorm2d does (momentum, unbiased running variance, num_batches_tracked); in eval mode it
calls F.gelu and F.batch_norm. `use_fused_gelu_batch_norm(model)` swaps it in place of every
GELU -> BatchNorm2d pair of an nn.Sequential: the GELU becomes nn.Identity and the BatchNorm2d a
FusedGeluBatchNorm2d holding the same Parameters and buffers under the same names, so the
state_dict and the optimizer are unaffected. Both ops are registered with torch.library, so
torch.compile keeps them in its graph and a CUDA graph can capture them.

Tests: test_convmixer.py checks output, running statistics and the three gradients against
F.gelu + nn.BatchNorm2d, on a CPU in Triton's interpreter and on a GPU in bfloat16 autocast;
fast/check_kernels.py compiles the kernels for an H100. train_cifar.py takes it with --fused-norm
(opt-in). Not yet part of --fast: that waits for its GPU tests (tools/gpu_check.sh tests), its speed
(python fast/benchmark.py --fused-norm) and a 25-epoch CIFAR-10 run with it.
"""
import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

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
def _normalize_kernel(z_ptr, mean_ptr, scale_ptr, bias_ptr, y_ptr, C, HW, BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    c = plane % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    _, g = _load_gelu(z_ptr + plane.to(tl.int64) * HW, offs, HW)
    y = (g - tl.load(mean_ptr + c)) * tl.load(scale_ptr + c) + tl.load(bias_ptr + c)
    tl.store(y_ptr + plane.to(tl.int64) * HW + offs, y.to(y_ptr.dtype.element_ty), mask=offs < HW)


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


# Each returns (kernel, grid, args, constexprs); fast/check_kernels.py compiles the same launches.
def stats_launch(z, plane_mean, plane_m2):
    B, C, H, W = z.shape
    return _plane_stats_kernel, (B * C,), (z, plane_mean, plane_m2, H * W), dict(BLOCK=_block(H * W))


def normalize_launch(z, mean, scale, bias, y):
    B, C, H, W = z.shape
    block = _block(H * W)
    return (_normalize_kernel, (B * C, triton.cdiv(H * W, block)), (z, mean, scale, bias, y, C, H * W),
            dict(BLOCK=block))


def grad_sums_launch(z, dy, mean, sum_dy, sum_dy_xc):
    B, C, H, W = z.shape
    return (_grad_sums_kernel, (B * C,), (z, dy, mean, sum_dy, sum_dy_xc, C, H * W),
            dict(BLOCK=_block(H * W)))


def grad_input_launch(z, dy, mean, a, b, d, dz):
    B, C, H, W = z.shape
    block = _block(H * W)
    return (_grad_input_kernel, (B * C, triton.cdiv(H * W, block)), (z, dy, mean, a, b, d, dz, C, H * W),
            dict(BLOCK=block))


def _run(launch):
    kernel, grid, args, meta = launch
    kernel[grid](*args, **meta)


def channel_statistics(plane_mean, plane_m2, plane_size):
    """The batch's per-channel mean and biased variance from each plane's (B, C) mean and sum of
    squared deviations: planes have the same size, so the mean is the mean of their means, and the
    squared deviations add up once each plane's offset from that mean is counted (Chan et al.)."""
    mean = plane_mean.mean(0)
    m2 = plane_m2.sum(0) + plane_size * (plane_mean - mean).square().sum(0)
    return mean, m2 / (plane_mean.shape[0] * plane_size)


@torch.library.custom_op("convmixer::gelu_batch_norm", mutates_args=())
def gelu_batch_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm2d(GELU(z)) of z (B, C, H, W): y in z's dtype, and the batch's
    per-channel mean and biased variance of GELU(z), float32 (C,)."""
    z = z.contiguous()
    B, C, H, W = z.shape
    plane_mean, plane_m2 = torch.empty(2, B, C, device=z.device, dtype=torch.float32)
    _run(stats_launch(z, plane_mean, plane_m2))
    mean, var = channel_statistics(plane_mean, plane_m2, H * W)
    scale = weight.float() * torch.rsqrt(var + eps)
    y = torch.empty_like(z)
    _run(normalize_launch(z, mean, scale, bias.float().contiguous(), y))
    return y, mean, var


@gelu_batch_norm.register_fake
def _(z, weight, bias, eps):
    C = z.shape[1]
    return torch.empty_like(z), z.new_empty(C, dtype=torch.float32), z.new_empty(C, dtype=torch.float32)


def backward_coefficients(weight, var, eps, sum_dy, sum_dy_xc, n):
    """With x = (g - mean) * rstd, rstd = 1 / sqrt(var + eps), over the n values of a channel:

        d bias   = sum(dy)                 d weight = sum(dy * x) = rstd * sum(dy * (g - mean))
        dg       = weight * rstd * (dy - d bias / n - x * d weight / n)
                 = a * dy + b * (g - mean) + d,   a = weight * rstd,
                   b = -weight * rstd^3 * sum(dy * (g - mean)) / n,   d = -weight * rstd * sum(dy) / n
    Returns (a, b, d, d weight, d bias), float32 (C,)."""
    rstd = torch.rsqrt(var + eps)
    a = weight.float() * rstd
    return a, -a * rstd.square() * sum_dy_xc / n, -a * sum_dy / n, rstd * sum_dy_xc, sum_dy


@torch.library.custom_op("convmixer::gelu_batch_norm_backward", mutates_args=())
def gelu_batch_norm_backward(dy: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                             var: torch.Tensor, eps: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz in z's dtype, d weight, d bias in weight's dtype) for gelu_batch_norm's output gradient dy."""
    z, dy = z.contiguous(), dy.contiguous()
    B, C, H, W = z.shape
    sum_dy, sum_dy_xc = torch.empty(2, B, C, device=z.device, dtype=torch.float32)
    _run(grad_sums_launch(z, dy, mean, sum_dy, sum_dy_xc))
    a, b, d, grad_weight, grad_bias = backward_coefficients(weight, var, eps, sum_dy.sum(0),
                                                            sum_dy_xc.sum(0), B * H * W)
    dz = torch.empty_like(z)
    _run(grad_input_launch(z, dy, mean, a, b, d, dz))
    return dz, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@gelu_batch_norm_backward.register_fake
def _(dy, z, weight, mean, var, eps):
    return torch.empty_like(z), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    z, weight, _, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(z, weight, mean, var)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var)          # they only feed the running statistics


def _backward(ctx, dy, _grad_mean, _grad_var):
    z, weight, mean, var = ctx.saved_tensors
    dz, grad_weight, grad_bias = gelu_batch_norm_backward(dy, z, weight, mean, var, ctx.eps)
    return dz, grad_weight, grad_bias, None


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

    def forward(self, z):
        if not self.training:                        # evaluation: the running statistics, unfused
            return F.batch_norm(F.gelu(z), self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        n = z.numel() // z.shape[1]                   # values per channel
        if n < 2:
            raise ValueError(f"FusedGeluBatchNorm2d: training needs more than 1 value per channel, "
                             f"got input of shape {tuple(z.shape)}")
        y, mean, var = gelu_batch_norm(z, self.weight, self.bias, self.eps)
        with torch.no_grad():                        # as nn.BatchNorm2d: the running variance unbiased
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * (n / (n - 1)), self.momentum)
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum} (GELU fused in)"


def use_fused_gelu_batch_norm(model: nn.Module) -> nn.Module:
    """Replace, in place, every GELU -> BatchNorm2d pair of an nn.Sequential inside `model` by
    nn.Identity -> FusedGeluBatchNorm2d (same index, so the same state_dict keys)."""
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(sequence) - 1):
            if is_fusable(sequence[i], sequence[i + 1]):
                sequence[i], sequence[i + 1] = nn.Identity(), FusedGeluBatchNorm2d(sequence[i + 1])
    return model
