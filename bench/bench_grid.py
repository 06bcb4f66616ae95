"""A grid of SAEs trained in one pass (``adaptive_sae.grid``) against ``train`` called per SAE.

    python bench/bench_grid.py                    # 6 rules x 3 seeds, d=64 F=512 k=8, B=1024
    python bench/bench_grid.py --B 256 --seeds 3 --json out.json

Both sides train the same 18 SAEs on the same in-memory tensor (1 torch thread). Step time by
differencing two run lengths (set-up and initialisation cancel), each the best of ``repeats``;
throughput is SAE·tokens per second. The whole wall time of the long runs is given too.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import adaptive_sae as asae
import torch
from adaptive_sae.rules import rule_names


def members(d, F, k, B, steps, seeds):
    out = []
    for seed in range(seeds):
        for rule in rule_names(aliases=True):
            cfg = asae.SAEConfig(d_in=d, n_features=F, rule=rule, k=k)
            tcfg = asae.TrainConfig(
                batch_size=B, total_tokens=B * steps, seed=seed, init_sample_tokens=B
            )
            out.append((cfg, tcfg))
    return out


def seconds(kind, mem, data) -> float:
    t0 = time.perf_counter()
    if kind == "grid":
        from adaptive_sae.grid import train_many

        train_many(mem, data)
    else:
        for cfg, tcfg in mem:
            asae.train(cfg, tcfg, data)
    return time.perf_counter() - t0


def alternate(d, F, k, B, seeds, rounds=4, steps=8) -> dict[str, float]:
    """ms per step of all SAEs: ``Trainer.step`` of each SAE against ``GridTrainer.step``,
    alternating blocks of steps on the same batches (load drift hits both alike); best block."""
    from adaptive_sae.grid import GridTrainer

    mem = members(d, F, k, B, 10_000, seeds)
    data = torch.randn(B * (steps + 2), d, generator=torch.Generator().manual_seed(0))
    xs = [data[i * B : (i + 1) * B] for i in range(steps + 2)]
    alone = [asae.Trainer(c, t) for c, t in mem]
    grid = GridTrainer(mem)
    for t in alone + grid.trainers:
        t.init_from_data(xs[0])
    best = {"train x n": float("inf"), "grid": float("inf")}
    for _ in range(rounds):
        for kind in best:
            t0 = time.perf_counter()
            for x in xs[2:]:
                if kind == "grid":
                    grid.step(x)
                else:
                    for t in alone:
                        t.step(x)
            best[kind] = min(best[kind], 1e3 * (time.perf_counter() - t0) / steps)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--F", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--B", type=int, nargs="+", default=[1024])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--long", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--only", choices=["train", "grid"], default=None, help="one side (e.g. an older library)"
    )
    p.add_argument("--alternate", action="store_true", help="also: steps alternated in one process")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kinds = {"train": ["train x n"], "grid": ["grid"], None: ["train x n", "grid"]}[a.only]
    rows = []
    for B in a.B:
        data = torch.randn(B * (a.long + 2), a.d, generator=torch.Generator().manual_seed(0))
        short, long = {}, {}
        for _ in range(a.repeats):
            for kind in kinds:
                ms = members(a.d, a.F, a.k, B, a.short, a.seeds)
                ml = members(a.d, a.F, a.k, B, a.long, a.seeds)
                short[kind] = min(short.get(kind, 1e18), seconds(kind, ms, data))
                long[kind] = min(long.get(kind, 1e18), seconds(kind, ml, data))
        n = len(members(a.d, a.F, a.k, B, 1, a.seeds))
        for kind in kinds:
            step = (long[kind] - short[kind]) / (a.long - a.short)
            rows.append(
                {
                    "B": B,
                    "how": kind.replace("x n", f"x {n}"),
                    "saes": n,
                    "step_ms_all": 1e3 * step,
                    "sae_tokens_per_s": n * B / step,
                    "wall_s_long": long[kind],
                }
            )
    load = os.getloadavg()
    print(
        f"# {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} thread(s), load "
        f"average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; d={a.d} F={a.F} k={a.k}, "
        f"{a.seeds} seeds x {rule_names(aliases=True)}"
    )
    print("| B | how | ms per step (all SAEs) | SAE·tokens/s | wall s (long run) | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for i in range(0, len(rows), len(kinds)):
        base = rows[i]["sae_tokens_per_s"]
        for r in rows[i : i + len(kinds)]:
            print(
                f"| {r['B']} | {r['how']} | {r['step_ms_all']:.1f} | {r['sae_tokens_per_s']:,.0f}"
                f" | {r['wall_s_long']:.1f} | {r['sae_tokens_per_s'] / base:.2f}× |"
            )
    if a.alternate:
        print("\n| B | ms per step, Trainer.step x n | ms per step, GridTrainer.step | speed-up |")
        print("|---|---:|---:|---:|")
        for B in a.B:
            r = alternate(a.d, a.F, a.k, B, a.seeds)
            print(
                f"| {B} | {r['train x n']:.1f} | {r['grid']:.1f} | "
                f"{r['train x n'] / r['grid']:.2f}× |"
            )
            rows.append({"B": B, "how": "alternate", **r})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
