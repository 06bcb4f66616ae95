"""The update kernel against the PyTorch calls it replaces, side by side in one process.

    python bench/bench_update.py                  # d×F of the suite and the main size, 1 and 2 threads
    python bench/bench_update.py --threads 1 --repeats 200

For each size: an SAE (its W_enc column-major, as trained) with a fused Adam that has taken a
step, and gradients in each parameter's layout; then (torch) ``remove_parallel_grad`` +
``clip_grad_norm_`` + ``trainer.adam_steps`` + ``normalize_decoder``, what ``Trainer._update``
runs without the kernel, and (kernel) ``update_kernel.project_and_norm`` +
``clip_adam_and_renormalize``; the best of the repeats each, and their ratio. The clip binds
in both (it is set below the gradient norm), the costlier case for the kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_select import best_ms  # noqa: E402

SIZES = [(64, 512), (128, 2048), (256, 4096), (512, 8192)]  # (d, F)


def time_size(d: int, F: int, repeats: int) -> tuple[float, float]:
    """(torch calls ms, kernel ms) at one size, best of ``repeats`` each."""
    import adaptive_sae as asae
    from adaptive_sae import update_kernel
    from adaptive_sae.trainer import adam_steps

    cfg = asae.SAEConfig(d_in=d, n_features=F, rule="topk", k=8)
    tcfg = asae.TrainConfig(batch_size=1024, total_tokens=1024)
    t = asae.Trainer(cfg, tcfg)
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in t.sae.named_parameters()}

    def set_grads():
        for n, p in t.sae.named_parameters():
            p.grad = torch.empty_like(p).copy_(grads[n])

    set_grads()
    t.opt.step()  # Adam's moments exist from here
    clip = 0.5 * float(torch.stack([v.norm() for v in grads.values()]).norm())
    assert update_kernel.applies(t.sae, t.opt)

    def by_torch():
        t.sae.remove_parallel_grad()
        torch.nn.utils.clip_grad_norm_(list(t.sae.parameters()), clip)
        adam_steps([t])
        t.sae.normalize_decoder()

    plan = update_kernel.plan_for(t.sae, t.opt)

    def by_kernel():
        gnorm = update_kernel.project_and_norm(plan)
        update_kernel.clip_adam_and_renormalize(plan, gnorm, clip)

    by_kernel()  # compiled (or loaded from numba's cache) before timing
    return (
        best_ms(lambda: (set_grads(), by_torch()), repeats) - best_ms(set_grads, repeats),
        best_ms(lambda: (set_grads(), by_kernel()), repeats) - best_ms(set_grads, repeats),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args(argv)
    print(f"# torch {torch.__version__}; the gradients are reset before each call (not timed)")
    print("| threads | d | F | parameters | torch ms | kernel ms | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|")
    for threads in a.threads:
        torch.set_num_threads(threads)
        for d, F in SIZES:
            t_torch, t_kernel = time_size(d, F, a.repeats)
            n = 2 * d * F + F + d
            print(
                f"| {threads} | {d} | {F} | {n / 1e6:.2f} M | {t_torch:.3f} | {t_kernel:.3f} | "
                f"{t_torch / t_kernel:.2f}× |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
