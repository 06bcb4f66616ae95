"""Training-step benchmark: this suite's step against the one dense product, and SAELens.

    python bench/bench_step.py                      # main configuration, CPU
    python bench/bench_step.py --suite all --device cuda
    python bench/bench_step.py --suite small --json results.json
    python bench/bench_step.py --suite gpt2 --device cuda [--bf16]   # d=768 F=24576 k=32 B=4096

Each row runs in its own process (so peak memory is that row's alone) and times the real
training step (``adaptive_sae.Trainer.step``: forward, losses, backward, decoder
projection, clipping, Adam, statistics, thresholds). Before every step the same process times
one dense ``torch.mm`` of the encoder's shape (B×d by d×F); the ratio column is the median over
steps of step time / that adjacent product time, which stays meaningful on a loaded machine.
``mm(out)`` is the same product into a preallocated output (no page faults), the stricter
denominator. When ``sae_lens`` is importable, its TopK and BatchTopK trainers
(``SAETrainer.step``) run on the same data, in the same way.

Peak memory is measured above what the process held before the SAE was built (CPU: the peak
resident set, reset through /proc/self/clear_refs; CUDA: max_memory_allocated), and compared to
the reference "B×F affinities + weights, gradients and Adam's two moments" (mem ×).

Auxiliary losses need dead or underutilised features, which a fresh SAE does not have; before
each step the benchmark marks 5 % of the features dead (aux_k; and SAELens's aux loss) and, for
aux_zipf, another 20 % underutilised with a deficit of γ·k/F each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "main": [dict(d=512, F=8192, k=32, B=4096)],
    "small": [dict(d=128, F=2048, k=16, B=4096)],
    "sweep": [dict(d=512, F=2**e, k=32, B=4096) for e in range(11, 16)],
    # GPT-2 small's width at 32x expansion: the GPU target of issue 9 (fp32 and --bf16)
    "gpt2": [dict(d=768, F=24576, k=32, B=4096)],
}
# (impl, rule, aux) rows per suite
ROWS_MAIN = [
    ("suite", "topk", "none"),
    ("suite", "topk", "aux_k"),
    ("suite", "topk", "aux_zipf"),
    ("suite", "mutual_choice", "none"),
    ("suite", "mutual_choice", "aux_k"),
    ("suite", "feature_choice", "none"),
    ("suite", "feature_choice_zipf", "none"),
    ("suite", "feature_choice_zipf", "aux_zipf"),
    ("saelens", "topk", "none"),
    ("saelens", "topk", "aux_k"),
    ("saelens", "batch_topk", "none"),
]
ROWS_SWEEP = [
    ("suite", "topk", "none"),
    ("suite", "mutual_choice", "none"),
    ("suite", "feature_choice", "none"),
]
DEAD_FRACTION, UNDER_FRACTION = 0.05, 0.20


# ----- worker: one row in its own process ----------------------------------------------------------
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _mallinfo():
    """glibc's count of bytes in use (heap + mmapped chunks), or None off glibc."""
    import ctypes

    class _MI2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MI2
    except (OSError, AttributeError):
        return None

    def used() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return used


class _Memory:
    """Peak memory in use above a baseline. CUDA: the allocator's peak. CPU: glibc's bytes in
    use, sampled every ~0.2 ms by a thread during the measured steps (freed memory the heap
    keeps does not count), else the peak resident set."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        self.used = None if self.cuda else _mallinfo()
        self.ok = self.cuda or self.used is not None or os.path.exists("/proc/self/status")

    def _now(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.memory_allocated()
        return self.used() if self.used is not None else _rss_bytes("VmRSS")

    def baseline(self):
        self.base = self._now()

    def measure(self, fn):
        """Run fn() and return its peak memory above the baseline (bytes)."""
        import threading

        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            fn()
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        if self.used is None:  # peak resident set, restarted from the current one
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            fn()
            return _rss_bytes("VmHWM") - self.base
        peak, done = [self.used()], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], self.used())
                time.sleep(0.0002)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            fn()
        finally:
            done.set()
            th.join()
        return max(peak[0], self.used()) - self.base


def _make_data(torch, d, B, device, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    scale = torch.rand(d, generator=g) * 2
    return [((torch.randn(B, d, generator=g) * scale) @ mix + 0.5).to(device) for _ in range(n)]


def _suite_step(torch, spec, data, device):
    from adaptive_sae.config import SAEConfig, TrainConfig
    from adaptive_sae.trainer import Trainer

    d, F, k, B = spec["d"], spec["F"], spec["k"], spec["B"]
    cfg = SAEConfig(d_in=d, n_features=F, rule=spec["rule"], k=k)
    tcfg = TrainConfig(
        batch_size=B,
        total_tokens=B * 100_000,
        aux_loss=spec["aux"],
        device=str(device),
        autocast_bf16=spec["bf16"],
    )
    t = Trainer(cfg, tcfg)
    t.init_from_data(torch.cat(data)[:8192])
    dead = torch.arange(F, device=device) % round(1 / DEAD_FRACTION) == 0
    under = torch.arange(F, device=device) % round(1 / UNDER_FRACTION) == 1
    win = tcfg.dead_window_tokens

    def prepare():
        if spec["aux"] == "none":
            return
        st = t.stats
        st.tokens_since_match[dead] = win
        if spec["aux"] == "aux_zipf":
            st.underutilised_mask = dead | under
            st.deficits = torch.where(dead | under, tcfg.gamma * k / F, 0.0).float()

    def step(x):
        prepare()
        t.step(x)

    return step


def _saelens_step(torch, spec, data, device):
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d, F, k, B = spec["d"], spec["F"], spec["k"], spec["B"]
    if spec["rule"] == "batch_topk":
        sae = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=d, d_sae=F, k=k, device=str(device))
        )
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=F, k=k, device=str(device)))
    tcfg = SAETrainerConfig(
        total_training_samples=B * 100_000,
        train_batch_size_samples=B,
        device=str(device),
        autocast=spec["bf16"],
        lr_end=3e-5,
    )
    trainer = SAETrainer(tcfg, sae, data_provider=iter(()))
    dead = torch.arange(F, device=device) % round(1 / DEAD_FRACTION) == 0

    def step(x):
        if spec["aux"] != "none":
            trainer.n_forward_passes_since_fired[dead] = tcfg.dead_feature_window + 1
        trainer.step(x)
        trainer.n_training_steps += 1

    return step


def run_worker(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    d, F, B = spec["d"], spec["F"], spec["B"]
    data = _make_data(torch, d, B, device)
    xa = torch.randn(B, d, device=device)
    Wa = torch.randn(d, F, device=device)
    out = torch.empty(B, F, device=device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, *a):
        sync()
        t0 = time.perf_counter()
        fn(*a)
        sync()
        return time.perf_counter() - t0

    build = _saelens_step if spec["impl"] == "saelens" else _suite_step
    # initialise the libraries (imports, thread pools, lazy kernels) on a tiny problem first,
    # so that the memory baseline holds them and the peak holds only this SAE's training
    tiny = {**spec, "d": 16, "F": 64, "k": 4, "B": 128}
    tiny_step = build(torch, tiny, _make_data(torch, 16, 128, device), device)
    for x in _make_data(torch, 16, 128, device, n=2):
        tiny_step(x)
    del tiny_step
    mem = _Memory(torch, device)
    mem.baseline()
    step = build(torch, spec, data, device)
    steps, ratios, ratios_out, mms, mms_out = [], [], [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t_mm = timed(lambda: torch.mm(xa, Wa))
        t_mo = timed(lambda: torch.mm(xa, Wa, out=out))
        t_st = timed(step, data[i % len(data)])
        if i >= spec["warmup"]:
            steps.append(t_st)
            mms.append(t_mm)
            mms_out.append(t_mo)
            ratios.append(t_st / t_mm)
            ratios_out.append(t_st / t_mo)

    def two_steps():  # without the reference products in between
        for i in range(2):
            step(data[i % len(data)])

    peak = mem.measure(two_steps) if mem.ok else float("nan")
    n_params = 2 * d * F + F + d
    ref = B * F * 4 + 4 * n_params * 4
    med = statistics.median(steps)
    return {
        **spec,
        "median_ms": med * 1e3,
        "tokens_per_s": B / med,
        "mm_ms": statistics.median(mms) * 1e3,
        "mm_out_ms": statistics.median(mms_out) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_mm_out": statistics.median(ratios_out),
        "peak_mb": peak / 2**20,
        "ref_mb": ref / 2**20,
        "mem_ratio": peak / ref,
    }


def run_pair(spec: dict) -> dict:
    """This suite's step and SAELens's, alternating step by step in one process."""
    import torch

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    data = _make_data(torch, spec["d"], spec["B"], device)
    ours = _suite_step(torch, {**spec, "impl": "suite", "rule": spec["rule"]}, data, device)
    theirs = _saelens_step(
        torch, {**spec, "impl": "saelens", "rule": spec["sl_rule"]}, data, device
    )
    cuda = device.type == "cuda"

    def timed(fn, x):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    t_o, t_t, speed = [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        x = data[i % len(data)]
        if i % 2:  # alternate which goes first
            a = timed(ours, x)
            b = timed(theirs, x)
        else:
            b = timed(theirs, x)
            a = timed(ours, x)
        if i >= spec["warmup"]:
            t_o.append(a)
            t_t.append(b)
            speed.append(b / a)
    B = spec["B"]
    return {
        **spec,
        "suite_tokens_per_s": B / statistics.median(t_o),
        "saelens_tokens_per_s": B / statistics.median(t_t),
        "speedup": statistics.median(speed),
    }


# ----- driver -----------------------------------------------------------------------------------
def _saelens_available(python: str) -> bool:
    r = subprocess.run([python, "-c", "import sae_lens"], capture_output=True)
    return r.returncode == 0


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _label(impl: str, rule: str, aux: str) -> str:
    name = {"suite": "suite", "saelens": "SAELens"}[impl]
    return f"{name} {rule}" + ("" if aux == "none" else f" + {aux}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", choices=["main", "small", "sweep", "gpt2", "all"], default="main")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20, help="measured steps per row (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sweep-steps", type=int, default=10, help="measured steps in the width sweep")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both libraries")
    p.add_argument("--no-saelens", action="store_true")
    p.add_argument(
        "--only", default="", help="comma-separated rules to keep (e.g. topk,batch_topk)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default="", help="write all rows to this JSON file")
    p.add_argument(
        "--pairs",
        action="store_true",
        help="instead: this suite and SAELens alternating step by step in one process",
    )
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        res = run_pair(spec) if spec["impl"] == "pair" else run_worker(spec)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if a.pairs:
        return _pairs(a)

    use_sl = not a.no_saelens and _saelens_available(sys.executable)
    suites = ["main", "small", "sweep"] if a.suite == "all" else [a.suite]
    jobs = []
    for s in suites:
        rows = ROWS_SWEEP if s == "sweep" else ROWS_MAIN
        for conf in CONFIGS[s]:
            for impl, rule, aux in rows:
                if impl == "saelens" and not use_sl:
                    continue
                if a.only and rule not in a.only.split(","):
                    continue
                steps = a.sweep_steps if s == "sweep" else a.steps
                jobs.append(
                    dict(
                        suite=s,
                        impl=impl,
                        rule=rule,
                        aux=aux,
                        device=a.device,
                        bf16=a.bf16,
                        steps=steps,
                        warmup=a.warmup,
                        threads=a.threads,
                        **conf,
                    )
                )
    print(
        f"# {_machine(a.device)}; load average {os.getloadavg()[0]:.2f} at start"
        + ("" if use_sl else "; sae_lens not installed: SAELens rows skipped"),
        flush=True,
    )
    results = []
    hdr = (
        "| config | rule | median ms | tokens/s | × mm | × mm(out) | peak MB | mem × |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    print(hdr, flush=True)
    for job in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        conf = f"d={job['d']} F={job['F']} k={job['k']} B={job['B']}"
        if line is None:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(
                f"| {conf} | {_label(job['impl'], job['rule'], job['aux'])} | failed: {err} |",
                flush=True,
            )
            continue
        res = json.loads(line[7:])
        results.append(res)
        print(
            f"| {conf} | {_label(res['impl'], res['rule'], res['aux'])} | {res['median_ms']:.1f} "
            f"| {res['tokens_per_s']:,.0f} | {res['ratio']:.2f} | {res['ratio_mm_out']:.2f} "
            f"| {res['peak_mb']:.0f} | {res['mem_ratio']:.2f} |",
            flush=True,
        )
    print(f"# load average {os.getloadavg()[0]:.2f} at end", flush=True)
    _speedups(results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": _machine(a.device), "rows": results}, f, indent=1)
    return 0


PAIRS = [
    ("topk", "none", "topk"),
    ("topk", "aux_k", "topk"),
    ("mutual_choice", "none", "batch_topk"),
]


def _pairs(a) -> int:
    if not _saelens_available(sys.executable):
        print("sae_lens is not installed in this environment; see bench/README.md.")
        return 1
    suites = ["main", "small"] if a.suite == "all" else [a.suite]
    print(f"# {_machine(a.device)}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    print("| config | suite step | SAELens step | suite tokens/s | SAELens tokens/s | speedup |")
    print("|---|---|---|---:|---:|---:|", flush=True)
    rows = []
    for s in suites:
        for conf in CONFIGS[s]:
            for rule, aux, sl_rule in PAIRS:
                if a.only and rule not in a.only.split(","):
                    continue
                job = dict(
                    impl="pair",
                    rule=rule,
                    sl_rule=sl_rule,
                    aux=aux,
                    device=a.device,
                    bf16=a.bf16,
                    steps=a.steps,
                    warmup=a.warmup,
                    threads=a.threads,
                    **conf,
                )
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
                c = f"d={job['d']} F={job['F']} k={job['k']} B={job['B']}"
                tail = "" if aux == "none" else " + aux"
                if line is None:
                    err = (r.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"| {c} | {rule}{tail} | {sl_rule}{tail} | failed: {err} |", flush=True)
                    continue
                res = json.loads(line[7:])
                rows.append(res)
                print(
                    f"| {c} | {rule}{'' if aux == 'none' else ' + ' + aux} | {sl_rule}{tail} "
                    f"| {res['suite_tokens_per_s']:,.0f} | {res['saelens_tokens_per_s']:,.0f} "
                    f"| {res['speedup']:.2f}x |",
                    flush=True,
                )
    print(
        f"# load average {os.getloadavg()[0]:.2f} at end; speedup = median over steps of "
        f"SAELens step time / this suite's step time on the same batch",
        flush=True,
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": _machine(a.device), "pairs": rows}, f, indent=1)
    return 0


def _speedups(results: list[dict]) -> None:
    """Throughput of this suite over SAELens, per configuration: from tokens/s, and from the
    × mm columns (each normalised by the product timed beside it, so less sensitive to load
    that changes between rows)."""
    by = {(r["d"], r["F"], r["k"], r["impl"], r["rule"], r["aux"]): r for r in results}
    pairs = [
        ("topk", "none", "topk", "none"),
        ("topk", "aux_k", "topk", "aux_k"),
        ("mutual_choice", "none", "batch_topk", "none"),
    ]
    for (d, F, k, impl, rule, aux), r in sorted(by.items()):
        if impl != "suite":
            continue
        for ours, oaux, theirs, taux in pairs:
            if (rule, aux) == (ours, oaux) and (d, F, k, "saelens", theirs, taux) in by:
                s = by[(d, F, k, "saelens", theirs, taux)]
                print(
                    f"# d={d} F={F} k={k}: suite {ours}{'' if aux == 'none' else ' + ' + aux} "
                    f"vs SAELens {theirs}{'' if taux == 'none' else ' + aux'}: "
                    f"{r['tokens_per_s'] / s['tokens_per_s']:.2f}x tokens/s, "
                    f"{s['ratio'] / r['ratio']:.2f}x by the x mm ratios"
                )


if __name__ == "__main__":
    raise SystemExit(main())
