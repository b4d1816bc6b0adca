"""Matrix products and the default model's convolutions: PyTorch's own kernels against ``vae.fast.gemm``.

Two tables, float32 on the CPU, medians of ``--repeats`` timed calls after warm-up, under
``retained_heap`` as training runs:

1. ``x @ W.T`` for the shapes the default model's linear layers and 2×2 convolutions multiply:
   ``torch.matmul`` (MKL's sgemm) against oneDNN's matmul (``vae.fast.gemm``), in GFLOP/s.
2. Each convolution of the default model (batch 128, channels-last), forward + backward (input,
   weight and bias gradients): PyTorch's convolution (oneDNN's direct kernels) against the matrix
   form (im2col / col2im + oneDNN's matmul). ``vae.fast`` takes the matrix form where the small
   side has at most ``MATMUL_MAX_POSITIONS`` positions per image; the last column says where.

    python -m benchmarks.gemm
    python -m benchmarks.gemm --threads 1
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import kernel_args
from vae.fast import gemm, retained_heap
from vae.fast.layers import MATMUL_MAX_POSITIONS

BATCH = 128
# (kind, in channels, out channels, input size, output padding): the seed's default model
LAYERS = [("conv", 1, 32, 28, 0), ("conv", 32, 64, 14, 0), ("conv", 64, 128, 7, 0), ("conv", 128, 256, 4, 0),
          ("convT", 256, 128, 2, 1), ("convT", 128, 64, 4, 0), ("convT", 64, 32, 7, 1), ("convT", 32, 32, 14, 1)]
# (M, K, N): the linear layers' shapes (fc_mu / fc_log_var, decoder_input; kept in torch.nn: no gain on
# the Intel Xeon, 1.7-2.3x on AMD Zen 5 but under 3% of a step) and the 2×2 convolutions' products
MATMULS = [(128, 1024, 128), (128, 128, 1024), (512, 1152, 256), (512, 256, 1152), (256, 512, 1152)]


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmul_table(repeats: int) -> None:
    print("| x @ W.T (M × K, N) | MFLOP | torch.matmul (MKL) ms | GFLOP/s | oneDNN matmul ms | GFLOP/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m, k, n in MATMULS:
        a, w = torch.randn(m, k), torch.randn(n, k)
        mflop = 2 * m * k * n / 1e6
        t_mkl = _median_ms(lambda: torch.matmul(a, w.T), repeats)
        t_dnn = _median_ms(lambda: gemm._mm(a, w), repeats)
        print(f"| {m} × {k}, {n} | {mflop:.0f} | {t_mkl:.3f} | {mflop / t_mkl:.0f} | {t_dnn:.3f} | "
              f"{mflop / t_dnn:.0f} | {t_mkl / t_dnn:.2f} |")


def conv_table(repeats: int) -> None:
    print("\n| layer | map | PyTorch conv fwd+bwd ms | matrix form fwd+bwd ms | speed-up | vae.fast uses |")
    print("|---|---|---:|---:|---:|---|")
    cl = torch.channels_last
    for kind, c_in, c_out, size, out_pad in LAYERS:
        x = torch.randn(BATCH, c_in, size, size).contiguous(memory_format=cl).requires_grad_(c_in > 1)
        shape = (c_out, c_in, 3, 3) if kind == "conv" else (c_in, c_out, 3, 3)
        w = torch.randn(shape).contiguous(memory_format=cl).requires_grad_()
        b = torch.randn(c_out, requires_grad=True)
        if kind == "conv":
            plain, fast = (lambda: F.conv2d(x, w, b, 2, 1)), (lambda: gemm.conv2d(x, w, b, 2, 1))
        else:
            plain = lambda: F.conv_transpose2d(x, w, b, 2, 1, out_pad)  # noqa: E731
            fast = lambda: gemm.conv_transpose2d(x, w, b, 2, 1, out_pad)  # noqa: E731
        y = plain()
        g = torch.randn_like(y)
        small = y.shape[-1] ** 2 if kind == "conv" else size ** 2

        def step(fn):
            return lambda: fn().backward(g)

        t_plain, t_fast = _median_ms(step(plain), repeats), _median_ms(step(fast), repeats)
        used = "matrix form" if small <= MATMUL_MAX_POSITIONS else "PyTorch conv"
        print(f"| {kind} {c_in}→{c_out} | {size}×{size}→{y.shape[-1]}×{y.shape[-1]} | {t_plain:.2f} | {t_fast:.2f} | "
              f"{t_plain / t_fast:.2f} | {used} |")


def main(argv=None) -> None:
    p = kernel_args.parser(__doc__)
    p.add_argument("--repeats", type=int, default=30)
    args = kernel_args.parse(p, argv)
    if not gemm.available():
        raise SystemExit("this PyTorch build has no oneDNN matmul op (torch.ops.mkldnn._linear_pointwise): "
                         "vae.gemm falls back to PyTorch's kernels, nothing to compare")
    torch.manual_seed(0)
    print(f"\nfloat32, {torch.get_num_threads()} thread(s), medians of {args.repeats}\n")
    with retained_heap():
        matmul_table(args.repeats)
        conv_table(args.repeats)


if __name__ == "__main__":
    main()
