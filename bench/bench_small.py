"""Single-SAE training speed at the suite's own sizes, as multiples of one dense product.

    python bench/bench_small.py                         # d=64 F=512 k=8, B=256 and 1024, 1 thread
    python bench/bench_small.py --rules topk --B 1024 --json out.json
    python bench/bench_small.py --main                  # d=512 F=8192 k=32 B=4096, 2 threads
    python bench/bench_small.py --floor                 # + the primitives a step is made of
    python bench/bench_small.py --kernels both          # with and without the compiled kernels

The step time is that of the whole public ``train`` (statistics, thresholds, history included):
two runs of different lengths on the same in-memory tensor, their wall-time difference divided
by the difference in steps, so set-up, initialisation and the end-of-run work cancel. Beside each
row the same process times the dense ``torch.mm`` of the encoder's shape (B×d by d×F, best of
many); "× dense" is the step over that product. Rows interleave rules and repeat, and each
figure differences the best short and the best long run, the statistics least disturbed by
other work on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import adaptive_sae as asae
import torch
from adaptive_sae import selection_kernels

RULES = ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf", "relu_l1"]


def dense_ms(B: int, d: int, F: int, reps: int = 50) -> float:
    x, W = torch.randn(B, d), torch.randn(d, F)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(x, W)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def best_ms(fn, reps: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def floor_rows(B: int, d: int, F: int, k: int) -> list[dict]:
    """The primitives a training step is built from, each timed alone (best of many) at this
    size, as multiples of the dense product: what no composition of them can go below."""
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(B, d, generator=g), torch.randn(d, F, generator=g)
    P = x @ W
    K = k * B
    t = P.flatten().kthvalue(P.numel() - 2 * K).values  # a threshold holding ~2K candidates
    PT = P.t().contiguous()
    m = max(1, K // F)
    keys = torch.randint(0, B * F, (K,), generator=g)
    params = [torch.randn(d, F), torch.randn(F, d), torch.randn(F), torch.randn(d)]
    for q in params:
        q.grad = torch.randn_like(q)
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    prims = {
        "dense product X·W_enc (the unit)": lambda: torch.mm(x, W),
        "one elementwise pass over P (ReLU)": lambda: P.relu(),
        "row maxima of P (amax)": lambda: P.amax(1),
        f"per-token top-{k} (torch.topk)": lambda: P.topk(k, 1, sorted=False),
        f"per-token top-{k}, columns ascending (selection_kernels; TopK's selection)": lambda: (
            selection_kernels.row_topk_columns(P, k)
        ),
        "P >= t and its nonzero (Mutual Choice's candidates)": lambda: (P >= t).nonzero(),
        f"per-feature top-{m} over tokens (Feature Choice, P transposed)": lambda: PT.topk(
            m, 1, sorted=False
        ),
        f"sort of K = {K} indices (grouping matches by feature)": lambda: keys.sort(),
        "Adam step on the SAE's parameters (fused)": lambda: opt.step(),
    }
    unit = best_ms(prims["dense product X·W_enc (the unit)"])
    return [
        {"B": B, "primitive": name, "ms": (ms := best_ms(fn)), "x_dense": ms / unit}
        for name, fn in prims.items()
    ]


def train_seconds(rule: str, d: int, F: int, k: int, B: int, steps: int, data, aux: str) -> float:
    cfg = asae.SAEConfig(d_in=d, n_features=F, rule=rule, k=k)
    tcfg = asae.TrainConfig(
        batch_size=B, total_tokens=B * steps, seed=0, aux_loss=aux, init_sample_tokens=B
    )
    t0 = time.perf_counter()
    asae.train(cfg, tcfg, data)
    return time.perf_counter() - t0


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s), load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rules", nargs="+", default=RULES)
    p.add_argument("--B", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--F", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--aux", default="none", choices=["none", "aux_k", "aux_zipf"])
    p.add_argument("--short", type=int, default=20, help="steps of the short run")
    p.add_argument("--long", type=int, default=120, help="steps of the long run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--main", action="store_true", help="d=512 F=8192 k=32 B=4096, 2 threads")
    p.add_argument("--floor", action="store_true", help="also time each primitive of a step")
    p.add_argument(
        "--kernels",
        default="on",
        choices=["on", "off", "both"],
        help="the compiled kernels (selections, loss) on, off (torch), or both side by side",
    )
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.main:
        a.d, a.F, a.k, a.B, a.threads = 512, 8192, 32, [4096], 2
        a.short, a.long = min(a.short, 3), min(a.long, 8)
        a.rules = [r for r in a.rules if r in ("topk", "mutual_choice", "feature_choice")]
    torch.set_num_threads(a.threads)
    modes = {"on": [True], "off": [False], "both": [False, True]}[a.kernels]
    kernels_found = selection_kernels.use_kernels
    variants = [(rule, on) for rule in a.rules for on in modes]
    rows = []
    for B in a.B:
        g = torch.Generator().manual_seed(0)
        data = torch.randn(B * (a.long + 2), a.d, generator=g)
        train_seconds(a.rules[0], a.d, a.F, a.k, B, a.short, data, a.aux)  # warm-up
        short: dict[str, float] = {}
        long: dict[str, float] = {}
        mm = float("inf")
        for _ in range(a.repeats):  # best short and best long run of each rule, differenced
            for v in variants:
                selection_kernels.use_kernels = v[1]
                mm = min(mm, dense_ms(B, a.d, a.F))
                s = train_seconds(v[0], a.d, a.F, a.k, B, a.short, data, a.aux)
                t = train_seconds(v[0], a.d, a.F, a.k, B, a.long, data, a.aux)
                short[v] = min(short.get(v, float("inf")), s)
                long[v] = min(long.get(v, float("inf")), t)
        best = {v: 1e3 * (long[v] - short[v]) / (a.long - a.short) for v in variants}
        for v in variants:
            rows.append(
                {
                    "B": B,
                    "rule": f"{v[0]} (kernel)" if a.kernels == "both" and v[1] else v[0],
                    "aux": a.aux,
                    "kernels": "on" if v[1] else "off",
                    "step_ms": best[v],
                    "tokens_per_s": B / best[v] * 1e3,
                    "dense_ms": mm,
                    "x_dense": best[v] / mm,
                }
            )
    print(f"# {machine()}; d={a.d} F={a.F} k={a.k} aux={a.aux}, whole train by differencing")
    print(
        "| B | rule | step ms | tokens/s | dense mm ms | × dense |\n|---|---|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['B']} | {r['rule']} | {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['dense_ms']:.3f} | {r['x_dense']:.1f} |"
        )
    selection_kernels.use_kernels = kernels_found
    floor = [r for B in a.B for r in floor_rows(B, a.d, a.F, a.k)] if a.floor else []
    if floor:
        print("\n| B | primitive (alone, best of 30) | ms | × dense |\n|---|---|---:|---:|")
        for r in floor:
            print(f"| {r['B']} | {r['primitive']} | {r['ms']:.3f} | {r['x_dense']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows, "floor": floor}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
