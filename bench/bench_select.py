"""Each rule's training selection alone, against the dense product of the same shape.

    python bench/bench_select.py                        # the suite's sizes, 1 thread
    python bench/bench_select.py --fc-sample 1024 256   # Feature Choice's candidate sample, side by side

Each rule is timed through the compiled kernels (``selection_kernels``; "kernel") and through
torch's paths ("torch"), side by side.

Times are the best of ``--repeats`` calls (ms) in one process, the dense product X·W_enc
(B×d by d×F, into a preallocated output) timed beside them; every setting
selects exactly the same entries (checked here) and differs only in time.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from adaptive_sae import SAEConfig, SparseAutoencoder, selection_kernels
from adaptive_sae.rules import feature_choice, get_rule

SIZES = [  # (B, d, F, k)
    (256, 64, 512, 8),
    (1024, 64, 512, 8),
    (1024, 128, 2048, 16),
    (2048, 128, 2048, 16),
    (4096, 128, 2048, 16),
    (4096, 512, 8192, 32),
]


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", nargs="+", default=["topk", "mutual_choice", "feature_choice",
                                                  "feature_choice_zipf"])  # fmt: skip
    p.add_argument("--fc-sample", type=int, nargs="*", default=[],
                   help="fixed sizes of Feature Choice's candidate sample to time beside the "
                        "default (B/8 rows, 256-1024)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--max-entries", type=int, default=2**26, help="skip larger B×F")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    print("| B | d | F | k | rule | setting | select ms | × dense |")
    print("|---|---|---|---|---|---|---:|---:|")
    default = feature_choice._FC_SAMPLE_ROWS
    for B, d, F, k in SIZES:
        if B * F > a.max_entries:
            continue
        g = torch.Generator().manual_seed(0)
        X, W = torch.randn(B, d, generator=g), torch.randn(d, F, generator=g) / d**0.5
        out = torch.empty(B, F)
        dense = best_ms(lambda: torch.mm(X, W, out=out), a.repeats)  # noqa: B023
        P = X @ W
        for name in a.rules:
            rule = get_rule(name)
            sae = SparseAutoencoder(SAEConfig(d_in=d, n_features=F, rule=name, k=k))
            settings = [("kernel", default, True), ("torch", default, False)]
            if name.startswith("feature_choice"):
                settings += [(f"torch, sample {r}", (r, r), False) for r in a.fc_sample]
            ref = None
            kernels_default = selection_kernels.use_kernels
            for label, rows, kernels in settings:
                feature_choice._FC_SAMPLE_ROWS = rows
                selection_kernels.use_kernels = kernels
                try:
                    idx = rule.select(sae, P)
                    ms = best_ms(lambda: rule.select(sae, P), a.repeats)  # noqa: B023
                finally:
                    feature_choice._FC_SAMPLE_ROWS = default
                    selection_kernels.use_kernels = kernels_default
                if ref is None:
                    ref = idx
                elif not torch.equal(idx, ref):
                    raise AssertionError(f"{name} {label}: a different selection")
                print(f"| {B} | {d} | {F} | {k} | {name} | {label} | {ms:.2f} | {ms / dense:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
