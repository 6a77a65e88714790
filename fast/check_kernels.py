"""Compile the Triton kernels of fast/ for an NVIDIA GPU on any machine, and check them.

    python fast/check_kernels.py               # for an H100 (sm_90); no GPU needed; about a minute
    python fast/check_kernels.py --arch 80 89  # for an A100 and an RTX 4090 / L4 / L40S

Triton compiles for a named GPU target without that GPU being present (ptxas comes with Triton),
so this finds what the CPU interpreter that runs the correctness tests cannot: code that does not
compile for the GPU, registers spilled to local memory, more shared memory than a block of that GPU
can have, and matrix products that do not become tensor-core instructions. It compiles exactly the
launches fast/depthwise.py makes (forward_launch, weight_grad_launch) for the shapes below, with the argument specializations Triton applies at run time
(16-divisible sizes, 16-aligned pointers).

One line per kernel: registers per thread, spilled bytes, shared memory, SASS instructions (the
static count; loops run their bodies many times) and how many of them are tensor-core (MMA)
instructions. Exits 1 if a kernel fails to compile, spills, needs too much shared memory, or a
bfloat16 "toeplitz" kernel has no MMA instruction. test_convmixer.py runs it for sm_90.

Measured with Triton 3.8.0 (results/check_kernels.txt): clean for sm_80, sm_90 and sm_120; sm_86,
sm_89 and sm_100 spill 8 bytes in one or two launches, none of them the design card's; on sm_75
(T4), which has no bfloat16 tensor cores, the bfloat16 "toeplitz" kernels become plain
multiply-adds and spill. Kernels wider than the "toeplitz" tile (k 17 and up at p 2, 33 and up at
p 1) take "direct", whose k x k loops are unrolled: they are not among the cases, since they compile
slowly (k 17: about half a minute on 2 CPU cores; k 31: minutes).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)     # the interpreter would replace the kernels we compile
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fast import depthwise as fast_depthwise  # noqa: E402

# Shared memory a block may have, by compute capability (CUDA C++ Programming Guide, technical
# specifications): T4; A100; RTX 30, A10; RTX 40, L4, L40S; H100, H200; B200; RTX 50.
MAX_SHARED_KB = {75: 64, 80: 163, 86: 99, 89: 99, 90: 227, 100: 227, 120: 99}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}

# (what, batch, channels, side, kernel size, dtype, algorithm)
CASES = [
    ("ConvMixer-256/8 k9 p1, CIFAR-10 (the design card)", 512, 256, 32, 9, torch.bfloat16, "auto"),
    ("the same, float32 (--amp-dtype float32)", 512, 256, 32, 9, torch.float32, "auto"),
    ("the same, 'direct' (benchmark breakdown)", 512, 256, 32, 9, torch.bfloat16, "direct"),
    ("ConvMixer-256/8 k5 p2, CIFAR-10", 512, 256, 16, 5, torch.bfloat16, "auto"),
    ("even kernel size", 64, 256, 32, 8, torch.bfloat16, "auto"),
    ("ConvMixer-1024/20 k9 p14, ImageNet", 64, 1024, 16, 9, torch.bfloat16, "auto"),
    ("small planes: CIFAR-10 at p4", 512, 256, 8, 3, torch.bfloat16, "auto"),
    ("large planes: 224 x 224 at p1", 16, 64, 224, 9, torch.bfloat16, "auto"),
]


def signature(kernel, args, constexprs):
    """Triton's compile signature and run-time specialization for `args` of `kernel`."""
    names = [name for name in kernel.arg_names if name not in constexprs]
    sig, attrs = {}, {}
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]          # torch allocations are aligned
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    sig.update({name: "constexpr" for name in constexprs})
    return sig, attrs


def nvidia_tool(name):
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def inspect(compiled):
    """registers, spilled bytes, shared bytes, SASS instructions, MMA instructions."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([nvidia_tool("cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))  # noqa: E731
    instructions = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    mma = sum(op.split(".")[0].endswith("MMA") for op in instructions)   # HMMA, HGMMA, UTCHMMA (sm_100)
    return field("REG"), field("STACK") + field("LOCAL"), compiled.metadata.shared, len(instructions), mma


def launches(batch, channels, side, k, dtype, algorithm):
    """The two kernel launches of a forward + backward (the input gradient reuses the forward)."""
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(batch, channels, side, side, **meta)
    weight = torch.empty(channels, 1, k, k, device="meta")
    bias = torch.empty(channels, device="meta")
    pad = (k - 1) // 2
    partial = torch.empty(1, channels, k * k, device="meta")
    return [("forward", fast_depthwise.forward_launch(x, weight, bias, x, pad, pad, algorithm)),
            ("weight grad", fast_depthwise.weight_grad_launch(x, x, partial, k, pad, pad, algorithm, 16))]


def main(cases=CASES, arch=90):
    """Compile and inspect every case's launches for sm_`arch`; 0 if all are clean, else 1."""
    if arch not in MAX_SHARED_KB:
        raise SystemExit(f"--arch {arch}: not one of {', '.join(map(str, MAX_SHARED_KB))}")
    target, failures = GPUTarget("cuda", arch, 32), 0
    print(f"Triton {triton.__version__}, target {target.backend} sm_{arch}")
    print(f"{'kernel':<42} {'regs':>4} {'spill':>5} {'smem':>6} {'sass':>6} {'mma':>4}  case")
    every_launch = [(what, dtype, launch) for what, batch, channels, side, k, dtype, algorithm in cases
                    for launch in launches(batch, channels, side, k, dtype, algorithm)]
    for what, dtype, (part, (kernel, _, args, constexprs)) in every_launch:
        name = f"{kernel.fn.__name__.strip('_')} {TRITON_TYPES[dtype]}"
        sig, attrs = signature(kernel, args, constexprs)
        try:
            compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target,
                                      options={"num_warps": 4})
        except Exception as e:          # noqa: BLE001 - report every kernel, then fail
            print(f"{name:<42} FAILED TO COMPILE: {type(e).__name__}: {str(e)[:300]}  {what}")
            failures += 1
            continue
        regs, spilled, shared, sass, mma = inspect(compiled)
        problems = [p for p, bad in [
            (f"spills {spilled} bytes", spilled > 0),
            (f"needs {shared} bytes of shared memory", shared > MAX_SHARED_KB[arch] * 1024),
            ("no tensor-core instruction", "toeplitz" in name and dtype != torch.float32 and mma == 0),
        ] if bad]
        failures += bool(problems)
        print(f"{name:<42} {regs:>4} {spilled:>5} {shared:>6} {sass:>6} {mma:>4}  {what}"
              + (f"  <- {', '.join(problems)}" if problems else ""), flush=True)
    print(f"all kernels compile cleanly for sm_{arch}" if not failures
          else f"{failures} kernel(s) with problems for sm_{arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(MAX_SHARED_KB),
                        metavar="SM", help="compute capabilities without their dot (80: 8.0, an A100)")
    results = [main(arch=arch) for arch in parser.parse_args().arch]
    sys.exit(max(results))
