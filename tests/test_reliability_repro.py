"""CPU runs are bit-for-bit repeatable: one small experiment point, run here and in a fresh
interpreter, gives the same table to the last digit (issue 13, item 16)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

POINT = textwrap.dedent(
    """
    import pandas as pd
    import torch

    import adaptive_sae as asae
    from adaptive_sae.data import activation_source

    def table() -> str:
        torch.set_num_threads(1)
        src = activation_source("synthetic", d_in=16, n_true_features=64, k_true=2, seed=3)
        x_test = src.held_out(512)
        rows = []
        for rule in ("topk", "feature_choice_zipf"):
            cfg = asae.SAEConfig(d_in=16, n_features=64, rule=rule, k=2)
            tcfg = asae.TrainConfig(
                batch_size=64, total_tokens=64 * 20, init_sample_tokens=256, log_every=10,
                aux_loss="aux_zipf", seed=1,
            )
            run = asae.train(cfg, tcfg, src)
            for mode in ("train", "inference"):
                ev = asae.evaluate(run.sae, x_test, mode=mode)
                rows.append({"rule": rule, "mode": mode, **ev.scalars()})
            rows.append({"rule": rule, "mode": "history", "nmse": run.history["nmse"].sum()})
        return pd.DataFrame(rows).to_csv(index=False, float_format="%.17g")
    """
)


def test_one_point_gives_identical_tables_in_two_processes():
    scope: dict = {}
    exec(POINT, scope)
    here = scope["table"]()
    again = subprocess.run(
        [sys.executable, "-c", POINT + "\nprint(table(), end='')"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "feature_choice_zipf" in here and "nan" not in here.split("\n")[1]
    assert again == here
    assert scope["table"]() == here  # and twice in one process
