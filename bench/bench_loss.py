"""The loss kernel alone against the autograd path it replaces, side by side in one process.

    python bench/bench_loss.py                    # the sizes of bench/README.md, 1 and 2 threads
    python bench/bench_loss.py --threads 1 --repeats 20

For each size: TopK's selection of random affinities, then (torch) ``sparse_reconstruct`` +
``normalized_mse`` + backward, and (kernel) ``loss_kernel.nmse_and_grads``, the best of the
repeats each, and their ratio. The kernel runs in training only where K·d ≤
``loss_kernel.MAX_WORK``; this prints every size, so that the bound can be checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_select import best_ms  # noqa: E402

SIZES = [  # (B, d, F, k)
    (1024, 64, 512, 8),
    (4096, 64, 512, 8),
    (1024, 128, 2048, 16),
    (4096, 128, 2048, 16),
    (4096, 256, 4096, 32),
    (4096, 512, 8192, 32),
]


def time_size(B: int, d: int, F: int, k: int, repeats: int) -> tuple[float, float]:
    """(autograd path ms, kernel ms) at one size, best of ``repeats`` each."""
    from adaptive_sae import loss_kernel, losses
    from adaptive_sae.rules.topk import select_topk
    from adaptive_sae.sparse_ops import affinities, sparse_reconstruct

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g)
    params = [
        (torch.randn(d, F, generator=g) * 0.1).requires_grad_(),
        (torch.randn(F, generator=g) * 0.01).requires_grad_(),
        (torch.randn(F, d, generator=g) * 0.1).requires_grad_(),
        (torch.randn(d, generator=g) * 0.1).requires_grad_(),
    ]
    W_enc, b_enc, W_dec, b_dec = params
    P = affinities(x, W_enc.detach(), b_enc.detach(), b_dec.detach())
    idx = select_topk(P, k)

    def by_autograd():
        for q in params:
            q.grad = None
        x_hat = sparse_reconstruct(x, *params, idx, P).x_hat
        losses.normalized_mse(x, x_hat).backward()

    def by_kernel():
        loss_kernel.nmse_and_grads(x, P, idx, W_enc, W_dec, b_dec)

    by_kernel()  # compiled (or loaded from numba's cache) before timing
    return best_ms(by_autograd, repeats), best_ms(by_kernel, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    from adaptive_sae import loss_kernel

    print(f"# torch {torch.__version__}; MAX_WORK = {loss_kernel.MAX_WORK:,}")
    print("| threads | B | d | F | k | K·d | torch ms | kernel ms | speed-up |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for threads in a.threads:
        torch.set_num_threads(threads)
        for B, d, F, k in SIZES:
            t_torch, t_kernel = time_size(B, d, F, k, a.repeats)
            print(
                f"| {threads} | {B} | {d} | {F} | {k} | {B * k * d / 1e6:.1f} M | "
                f"{t_torch:.2f} | {t_kernel:.2f} | {t_torch / t_kernel:.2f}× |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
