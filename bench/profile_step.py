"""Where a training step's time goes, phase by phase, as multiples of one dense product.

    python bench/profile_step.py --rule topk
    python bench/profile_step.py --rule mutual_choice --aux aux_k --device cuda

Wraps the phases of the real training step (``Trainer.step``) with timers: the dense
affinities, the selection, the sparse reconstruction (on a CPU the loss kernel: reconstruction,
NMSE and its gradient in one pass), the auxiliary loss, the backward pass,
the decoder projection, gradient clipping, Adam, the decoder renormalisation, and the rest
(losses, statistics, thresholds). Each is the median over the measured steps; the dense product
is timed before every step in the same process, as in bench_step.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rule", default="topk")
    p.add_argument("--aux", default="none", choices=["none", "aux_k", "aux_zipf"])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--F", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import adaptive_sae.sae as S
    import adaptive_sae.trainer as T
    from adaptive_sae.rules import get_rule

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    acc: dict[str, float] = defaultdict(float)

    def timer(name, fn):
        def wrapped(*args, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            sync()
            acc[name] += time.perf_counter() - t0
            return out

        return wrapped

    # the phases (module attributes the trainer looks up at call time)
    T.affinities = timer("affinities (dense product)", T.affinities)
    rule_cls = type(get_rule(a.rule))
    rule_cls.select = timer("selection", rule_cls.select)
    T.sparse_reconstruct = timer("sparse reconstruction (forward)", T.sparse_reconstruct)
    import adaptive_sae.loss_kernel as L  # on a CPU: reconstruction, NMSE and its gradient

    L.nmse_and_grads = timer("loss kernel (reconstruction, NMSE, gradient)", L.nmse_and_grads)
    T.Trainer._aux = timer("auxiliary loss (forward)", T.Trainer._aux)
    torch.Tensor.backward = timer("backward", torch.Tensor.backward)
    S.SparseAutoencoder.remove_parallel_grad = timer(
        "decoder gradient projection", S.SparseAutoencoder.remove_parallel_grad
    )
    torch.nn.utils.clip_grad_norm_ = timer("gradient clipping", torch.nn.utils.clip_grad_norm_)
    T.adam_steps = timer("Adam", T.adam_steps)
    S.SparseAutoencoder.normalize_decoder = timer(
        "decoder renormalisation", S.SparseAutoencoder.normalize_decoder
    )
    import adaptive_sae.update_kernel as U

    U.project_and_norm = timer("update kernel: projection and norm", U.project_and_norm)
    U.clip_adam_and_renormalize = timer(
        "update kernel: clipping, Adam, renormalisation", U.clip_adam_and_renormalize
    )
    T.Trainer._observe = timer("statistics and the rule's observation", T.Trainer._observe)
    T.Trainer.step = timer("step (total)", T.Trainer.step)

    spec = dict(
        impl="suite",
        rule=a.rule,
        aux=a.aux,
        d=a.d,
        F=a.F,
        k=a.k,
        B=a.B,
        bf16=a.bf16,
    )
    data = bench_step._make_data(torch, a.d, a.B, dev)
    step = bench_step._suite_step(torch, spec, data, dev)
    xa, Wa = torch.randn(a.B, a.d, device=dev), torch.randn(a.d, a.F, device=dev)
    rows: dict[str, list[float]] = defaultdict(list)
    for i in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        torch.mm(xa, Wa)
        sync()
        t_mm = time.perf_counter() - t0
        acc.clear()
        step(data[i % len(data)])
        if i >= a.warmup:
            rows["dense product torch.mm (reference)"].append(t_mm)
            for name, v in acc.items():
                rows[name].append(v)
            rest = acc["step (total)"] - sum(v for n, v in acc.items() if n != "step (total)")
            rows["rest (losses, checks, schedule, history)"].append(rest)
    mm = statistics.median(rows["dense product torch.mm (reference)"])
    print(f"# {bench_step._machine(a.device)}; {spec}")
    print("| phase | median ms | × mm |\n|---|---:|---:|")
    for name, v in rows.items():
        med = statistics.median(v)
        print(f"| {name} | {med * 1e3:.2f} | {med / mm:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
