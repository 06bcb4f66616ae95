"""Data-parallel training on the CPU: step time and bytes sent per step and rank, for 1 and 2
gloo processes, every rule, side by side in one run.

    python bench/bench_ddp.py [--d 128 --F 2048 --k 16 --B 2048 --steps 20]

Both process counts train the same global batches; "bytes/step" is what one rank sends
(``distributed.ProcessGroupComm.bytes``: gradients, selection, statistics). On a machine with
two cores, two processes of one thread each compete with nothing else only when it is idle:
read the ratios with the load average printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RULES = ("topk", "mutual_choice", "feature_choice", "feature_choice_zipf")


def _worker(rank, world, init, a, out):
    import adaptive_sae as asae

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(a.B * (a.steps + a.warmup), a.d, generator=g)
    res = {}
    for rule in RULES:
        cfg = asae.SAEConfig(d_in=a.d, n_features=a.F, rule=rule, k=a.k)
        tcfg = asae.TrainConfig(
            batch_size=a.B, total_tokens=a.B * (a.steps + a.warmup), log_every=10**9, lr=1e-3
        )
        t = asae.Trainer(cfg, tcfg)
        stamps, sent = [], []

        def cb(step, row, t=t, stamps=stamps, sent=sent):
            stamps.append(time.perf_counter())
            sent.append(t.comm.bytes)

        t.fit(data, callback=cb)
        dt = [b - a_ for a_, b in zip(stamps[a.warmup - 1 : -1], stamps[a.warmup :])]
        db = [b - a_ for a_, b in zip(sent[a.warmup - 1 : -1], sent[a.warmup :])]
        res[rule] = {"ms": 1e3 * sorted(dt)[len(dt) // 2], "bytes": sorted(db)[len(db) // 2]}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    if world > 1:
        dist.destroy_process_group()


def run(world: int, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), a, out), nprocs=world)
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--F", type=int, default=2048)
    p.add_argument("--k", type=float, default=16)
    p.add_argument("--B", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    one, two = run(1, a), run(2, a)
    n_params = 2 * a.d * a.F + a.F + a.d
    print(f"# d={a.d} F={a.F} k={a.k} global B={a.B}; load average {os.getloadavg()[0]:.1f}")
    print(f"# gradient all-reduce alone: {4 * n_params / 1e6:.2f} MB per rank and step")
    print("| rule | 1 process ms | 2 processes ms | speed-up | bytes/step/rank (2) |")
    print("|---|---:|---:|---:|---:|")
    for rule in RULES:
        t1, t2 = one[rule]["ms"], two[rule]["ms"]
        mb = two[rule]["bytes"] / 1e6
        print(f"| {rule} | {t1:.1f} | {t2:.1f} | {t1 / t2:.2f} | {mb:.2f} MB |")


if __name__ == "__main__":
    main()
