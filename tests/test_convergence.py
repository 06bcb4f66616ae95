"""The convergence protocol (DESIGN §11): the learning-rate grid extends until the best is
bracketed, the budget doubles until no rule moves by more than 1 %, max_tokens stops it with
converged False, the reported numbers come from the test half; one real tiny run end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import adaptive_sae
import pandas as pd
import pytest
import torch
from adaptive_sae import convergence
from adaptive_sae.experiments import Variant


class Stub:
    """A training driver whose validation NMSE is a known function of (rule, lr, tokens):
    a parabola in log(lr) around ``best_lr[rule]`` plus ``floor + scale / tokens``."""

    def __init__(self, best_lr, floor=None, scale=1e4, diverge_above=math.inf):
        self.best_lr, self.scale, self.diverge_above = best_lr, scale, diverge_above
        self.floor = floor or dict.fromkeys(best_lr, 0.1)
        self.calls: list[tuple[str, float, int, tuple, int]] = []

    def nmse(self, rule, lr, tokens, seed):
        shape = math.log(lr / self.best_lr[rule]) ** 2
        return self.floor[rule] + self.scale / tokens + 0.01 * shape + 1e-4 * seed

    def __call__(self, data, *, variants, seeds, lrs, total_tokens, eval_set, **kw):
        rows = []
        for v in variants:
            for lr in lrs:
                self.calls.append((v.name, lr, total_tokens, tuple(seeds), eval_set.x.shape[0]))
                if lr > self.diverge_above:
                    raise adaptive_sae.NonFiniteError("step 3: the loss is nan")
                for s in seeds:
                    nmse = self.nmse(v.name, lr, total_tokens, s)
                    # the test half reads 2x the validation error, to tell them apart
                    split = 2.0 if float(eval_set.x[0, 0]) > 0 else 1.0
                    rows.append(
                        {
                            "variant": v.name,
                            "lr": lr,
                            "seed": s,
                            "nmse": split * nmse,
                            "l0_mean": 4.0,
                            "dead_pct": 10.0 * s,
                        }  # fmt: skip
                    )
        return SimpleNamespace(table=pd.DataFrame(rows), runs=[])


def held():
    """8 held-out tokens: the validation half reads x < 0, the test half x > 0."""
    return torch.cat([-torch.ones(4, 2), torch.ones(4, 2)])


DATA = torch.zeros(64, 2)


def V(name):  # a named variant; the stub never trains it
    return Variant(name, "topk")


def test_grid_extends_until_the_best_learning_rate_is_bracketed():
    stub = Stub({"a": 0.27, "b": 1e-3})
    conv = convergence.converge(
        DATA, held(), rules=[V("a"), V("b")], k=2, n_features=4, batch_size=8, seeds=(0,),
        lrs=(1e-3, 3e-3, 1e-2), start_tokens=1000, max_tokens=1000, fit=stub,
    )  # fmt: skip
    first = conv.curve[conv.curve["tokens"] == 1000].set_index("rule")
    # a's optimum 0.27 lies above the grid: 1e-2 -> 3e-2 -> 9e-2 -> 0.27 -> 0.81
    assert first.loc["a", "lr"] == pytest.approx(0.27)
    assert first.loc["a", "lr_below"] == pytest.approx(0.09)
    assert first.loc["a", "lr_above"] == pytest.approx(0.81)
    # b's optimum is the grid's lowest value: one step below brackets it
    assert first.loc["b", "lr"] == pytest.approx(1e-3)
    assert first.loc["b", "lr_below"] == pytest.approx(1e-3 / 3, rel=1e-3)
    assert first["bracketed"].all()
    tried_a = sorted(lr for r, lr, *_ in stub.calls if r == "a")
    assert tried_a[-1] == pytest.approx(0.81) and len(set(tried_a)) >= 6


def test_doubling_stops_when_no_rule_moves_by_more_than_tolerance():
    # NMSE = 0.1 + 1e4 / tokens at the optimum: the relative change of each doubling shrinks
    stub = Stub({"a": 1e-2, "b": 3e-3})
    conv = convergence.converge(
        DATA, held(), rules=[V("a"), V("b")], k=2, n_features=4, batch_size=8, seeds=(0, 1),
        lrs=(1e-3, 3e-3, 1e-2, 3e-2), start_tokens=10_000, fit=stub,
    )  # fmt: skip
    budgets = sorted(conv.curve["tokens"].unique())
    assert budgets == [10_000 * 2**i for i in range(len(budgets))]

    def change(t):  # relative change from t/2 to t at the optimum
        return (1e4 / (t / 2) - 1e4 / t) / (0.1 + 1e4 / (t / 2))

    last = budgets[-1]
    assert change(last) <= 0.01 < change(last / 2)
    assert conv.table["converged"].all() and (conv.table["tokens"] == last).all()
    assert (conv.curve.groupby("tokens")["change"].max().iloc[1:-1] > 0.01).all()


def test_max_tokens_stops_with_converged_false():
    stub = Stub({"a": 1e-2}, scale=1e6)
    table = convergence.compare_rules(
        DATA, held(), rules=[V("a")], k=2, n_features=4, batch_size=8, seeds=(0,),
        start_tokens=1000, max_tokens=7000, fit=stub,
    )  # fmt: skip
    assert not table["converged"].any()
    assert table["tokens"].iloc[0] == 4000  # 1000, 2000, 4000; 8000 would pass max_tokens
    assert sorted({c[2] for c in stub.calls}) == [1000, 2000, 4000]


def test_seeds_on_test_tokens_and_search_on_validation_with_one_seed():
    stub = Stub({"a": 1e-2, "b": 1e-2})
    table = convergence.compare_rules(
        DATA, held(), rules=[V("a"), V("b")], k=2, n_features=4, batch_size=8, seeds=(0, 1, 2),
        lrs=(3e-3, 1e-2, 3e-2), start_tokens=1000, max_tokens=1000, fit=stub,
    )  # fmt: skip
    search = [c for c in stub.calls if c[3] == (0,)]
    final = [c for c in stub.calls if c[3] == (0, 1, 2)]
    assert search and all(c[4] == 4 for c in search)  # validation half
    assert len(final) == 2 and all(c[1] == pytest.approx(1e-2) for c in final)
    row = table.set_index("rule").loc["a"]
    expected = [2 * stub.nmse("a", 1e-2, 1000, s) for s in (0, 1, 2)]  # test half reads 2x
    assert row["nmse_mean"] == pytest.approx(sum(expected) / 3)
    assert row["nmse_std"] == pytest.approx(pd.Series(expected).std())
    assert row["dead_pct_mean"] == pytest.approx(10.0) and row["seeds"] == 3
    assert {"rule", "nmse_mean", "nmse_std", "lr", "tokens", "converged", "l0_mean_mean"} <= set(
        table.columns
    )


def test_a_diverging_learning_rate_counts_as_worst():
    stub = Stub({"a": 0.05}, diverge_above=0.02)
    conv = convergence.converge(
        DATA, held(), rules=[V("a")], k=2, n_features=4, batch_size=8, seeds=(0,),
        lrs=(3e-3, 1e-2), start_tokens=1000, max_tokens=1000, fit=stub,
    )  # fmt: skip
    row = conv.curve.iloc[0]
    assert row["lr"] == pytest.approx(1e-2) and row["lr_above"] == pytest.approx(3e-2)
    assert math.isinf(conv.lr_trials.set_index("lr").loc[0.03, "nmse"])


def test_cache_resumes_without_training_again(tmp_path):
    kwargs = dict(
        rules=[V("a")], k=2, n_features=4, batch_size=8, seeds=(0, 1),
        start_tokens=1000, max_tokens=2000, cache_dir=tmp_path,
    )  # fmt: skip
    first = Stub({"a": 1e-2})
    t1 = convergence.compare_rules(DATA, held(), fit=first, **kwargs)
    again = Stub({"a": 1e-2})
    t2 = convergence.compare_rules(DATA, held(), fit=again, **kwargs)
    assert first.calls and not again.calls
    pd.testing.assert_frame_equal(t1, t2)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="rules is empty"):
        convergence.compare_rules(DATA, held(), rules=[], k=2, n_features=4)
    with pytest.raises(ValueError, match="max_tokens"):
        convergence.compare_rules(
            DATA, held(), rules=["topk"], k=2, n_features=4, start_tokens=1000, max_tokens=10
        )
    with pytest.raises(TypeError, match="held_out"):
        convergence.compare_rules(DATA, "nope", rules=["topk"], k=2, n_features=4)


def test_real_tiny_comparison_is_exported_and_reports_every_rule():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g)
    x = (torch.randn(6000, 8, generator=g) * torch.rand(8, generator=g)) @ mix
    table = adaptive_sae.compare_rules(
        x[:4096], x[4096:], rules=["topk", "mutual_choice"], k=2, n_features=16,
        batch_size=64, seeds=(0, 1), start_tokens=64 * 8, max_tokens=64 * 16,
        lrs=(3e-3, 1e-2, 3e-2), train_kwargs={"log_every": 100},
    )  # fmt: skip
    assert list(table["rule"]) == ["topk", "mutual_choice"]
    assert (table["nmse_mean"] > 0).all() and (table["nmse_mean"] < 1.5).all()
    assert table["lr_below"].lt(table["lr"]).all() and table["lr"].lt(table["lr_above"]).all()
    assert table.set_index("rule").loc["topk", "l0_mean_mean"] <= 2 + 1e-9


def test_train_uses_the_documented_default_learning_rate():
    """The default measured for short runs and small dictionaries (TrainConfig.lr):
    3.5e-3 / sqrt(F / 2**14), with the default warm-up and decay, is what train runs with."""
    from adaptive_sae.trainer import lr_at

    assert adaptive_sae.TrainConfig().lr is None
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    F = 32
    cfg = adaptive_sae.SAEConfig(d_in=8, n_features=F, rule="topk", k=2)
    tcfg = adaptive_sae.TrainConfig(batch_size=64, total_tokens=64 * 20, log_every=1)
    run = adaptive_sae.train(cfg, tcfg, x)
    expected = 3.5e-3 / math.sqrt(F / 2**14)
    assert run.info["lr"] == pytest.approx(expected)
    steps = run.history["step"].to_numpy() - 1
    want = [lr_at(int(s), 20, expected, 0.05, 0.2) for s in steps]
    assert run.history["lr"].to_numpy() == pytest.approx(want)
    assert max(run.history["lr"]) == pytest.approx(expected)


def test_study_writes_tables_and_figures(tmp_path):
    kwargs = dict(
        rules=["topk", "mutual_choice"], k=2, n_features=16, batch_size=64, seeds=[0, 1],
        max_tokens=64 * 16, start_tokens=64 * 8, lrs=[3e-3, 1e-2, 3e-2], data_tokens=2048,
        eval_tokens=256, synthetic={"d_in": 8, "n_true_features": 16, "k_true": 2}, log=None,
    )  # fmt: skip
    conv = convergence.study("synthetic", tmp_path / "convergence" / "s", **kwargs)
    out = tmp_path / "convergence" / "s"
    for name in ("table.csv", "curve.csv", "lr_trials.csv", "runs.csv", "summary.md",
                 "limits.csv", "nmse_vs_tokens.png", "lr_bracket.svg", "provenance.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert "converged: False" in (out / "summary.md").read_text()
    # two budgets are too few for the power-law fit: the table says so instead of guessing
    limits = pd.read_csv(out / "limits.csv")
    assert list(limits["rule"]) == ["topk", "mutual_choice"]
    assert (~limits["fit_ok"]).all() and limits["why"].str.contains("needs 5").all()
    assert len(conv.curve) == 2 * 2  # two budgets x two rules


def test_keep_runs_returns_the_final_grid_on_test_tokens():
    """With keep_runs the final budget's SAEs and long tables come back: one SAE per rule and
    seed, trained at the bracketed rate and budget, their densities and per-token L0 measured on
    the test half (the tokens no choice has seen), and the same NMSE the table reports."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 8, generator=g) @ torch.randn(8, 8, generator=g)
    held_out = torch.randn(256, 8, generator=g) @ torch.randn(8, 8, generator=g)
    conv = convergence.converge(
        x, held_out, rules=["topk", "feature_choice"], k=2, n_features=16, batch_size=64,
        seeds=(0, 1), start_tokens=64 * 8, max_tokens=64 * 8, lrs=(3e-3, 1e-2, 3e-2),
        keep_runs=True, keep_l0=True, train_kwargs={"log_every": 100},
    )  # fmt: skip
    final = conv.final
    assert sorted((t.variant, t.seed) for t in final.runs) == sorted(
        (r, s) for r in ("topk", "feature_choice") for s in (0, 1)
    )
    test = convergence.split_held_out(held_out)[1]
    assert (final.l0.groupby(["variant", "seed"]).size() == test.x.shape[0]).all()
    assert final.l0.loc[final.l0.variant == "topk", "l0"].max() <= 2
    assert (final.densities.groupby(["variant", "seed"]).size() == 16).all()
    lr = conv.table.set_index("rule")["lr"]
    assert all(t.run.info["lr"] == pytest.approx(lr[t.variant]) for t in final.runs)
    mean = final.table.groupby("variant")["nmse"].mean()
    assert mean.to_dict() == pytest.approx(conv.table.set_index("rule")["nmse_mean"].to_dict())


@pytest.mark.parametrize("keep_runs", [False, True])
def test_final_budget_measures_the_search_seeds_sae_instead_of_training_it_again(keep_runs):
    """The search seed at its best rate and the final budget was trained while bracketing; the
    final step measures that SAE on test tokens and trains only the other seeds. Its test row
    equals a fresh training of the same (data, seed, rate, budget) measured on test tokens."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 8, generator=g) @ torch.randn(8, 8, generator=g)
    held_out = torch.randn(256, 8, generator=g) @ torch.randn(8, 8, generator=g)
    calls = []

    def spy(data, **kw):
        calls.append(kw)
        return adaptive_sae.experiments.train_grid(data, **kw)

    conv = convergence.converge(
        x, held_out, rules=["topk", "mutual_choice"], k=2, n_features=16, batch_size=64,
        seeds=(0, 1), start_tokens=64 * 4, max_tokens=64 * 8, lrs=(3e-3, 1e-2, 3e-2),
        keep_runs=keep_runs, train_kwargs={"log_every": 100}, fit=spy,
    )  # fmt: skip
    test = convergence.split_held_out(held_out)[1]
    final_tokens = int(conv.table["tokens"].iloc[0])
    on_test = [kw for kw in calls if kw["eval_set"].x.data_ptr() == test.x.data_ptr()]
    assert [tuple(kw["seeds"]) for kw in on_test] == [(1,), (1,)]  # seed 0 never retrained
    assert sorted(zip(conv.runs["variant"], conv.runs["seed"])) == sorted(
        (r, s) for r in ("topk", "mutual_choice") for s in (0, 1)
    )
    for rule in ("topk", "mutual_choice"):
        lr = float(conv.table.set_index("rule").loc[rule, "lr"])
        searched = [
            kw for kw in calls
            if kw["variants"][0].name == rule and kw["lrs"] == [lr]
            and kw["total_tokens"] == final_tokens and tuple(kw["seeds"]) == (0,)
        ]  # fmt: skip
        assert len(searched) == 1
        fresh = adaptive_sae.experiments.train_grid(
            x, **{**searched[0], "eval_set": test, "keep_runs": False}
        )
        got = conv.runs[(conv.runs["variant"] == rule) & (conv.runs["seed"] == 0)]
        assert float(got["nmse"].iloc[0]) == pytest.approx(float(fresh.table["nmse"].iloc[0]))
    if keep_runs:
        assert sorted((t.variant, t.seed) for t in conv.final.runs) == sorted(
            (r, s) for r in ("topk", "mutual_choice") for s in (0, 1)
        )


def test_notebook_converge_runs_the_protocol_per_setting_and_saves_its_tables(tmp_path):
    from adaptive_sae import notebook

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 8, generator=g)
    out = SimpleNamespace(path=tmp_path, saved={})
    out.save_table = lambda name, frame: out.saved.setdefault(name, frame)
    params = dict(
        variants=["topk", "mutual_choice"], k=2, n_features=16, batch_size=64, seeds=[0],
        total_tokens=64 * 4, learning_rates=[1e-2, 3e-2], device="cpu",
    )  # fmt: skip
    nb = notebook.Setup("x", params, out, None, x, adaptive_sae.experiments.EvalSet(x[:256]), False)
    conv = notebook.converge(nb, over={"input_scaling": ["global", "per_token"]})
    assert set(out.saved) == {"protocol", "curve", "lr_trials"}
    assert len(conv.protocol) == 4 and set(conv.protocol["input_scaling"]) == {
        "global",
        "per_token",
    }
    assert (conv.protocol["tokens"] == 64 * 4).all() and conv.tokens == 64 * 4
    assert set(zip(conv.runs["variant"], conv.runs["input_scaling"])) == {
        (v, s) for v in ("topk", "mutual_choice") for s in ("global", "per_token")
    }
    row = conv.protocol[(conv.protocol.rule == "topk") & (conv.protocol.input_scaling == "global")]
    assert conv.lr("topk", input_scaling="global") == float(row["lr"].iloc[0])
    assert len(conv.final.runs) == 4 and conv.test_set.x.shape[0] == 128
    with pytest.raises(KeyError):
        conv.lr("topk")  # two settings: ambiguous
