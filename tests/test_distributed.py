"""Data-parallel training (adaptive_sae.distributed): two gloo processes on the CPU select the
same entries and reach the same weights as one process on the same global batches, for every
rule and both auxiliary losses."""

from __future__ import annotations

import os

import adaptive_sae as asae
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from adaptive_sae import distributed as D
from adaptive_sae.rules import get_rule, rule_names
from adaptive_sae.rules.feature_choice import select_feature_choice
from adaptive_sae.rules.mutual_choice import select_mutual_choice

WORLD = 2
D_IN, F, K, B, STEPS = 16, 64, 4.0, 64, 6
CASES = [(r, aux) for r in rule_names(aliases=False) for aux in ("none", "aux_k", "aux_zipf")]


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(D_IN, D_IN, generator=g)
    return (torch.randn(B * STEPS, D_IN, generator=g) * torch.rand(D_IN, generator=g)) @ mix


def _configs(rule: str, aux: str):
    cfg = asae.SAEConfig(d_in=D_IN, n_features=F, rule=rule, k=K)
    tcfg = asae.TrainConfig(
        batch_size=B,
        total_tokens=B * STEPS,
        aux_loss=aux,
        lr=3e-3,
        log_every=1,
        dead_window_tokens=B,  # features die fast, so the aux losses have work
        zipf_refit_every=2,
        demand_rerank_every=2,
        init_sample_tokens=B,
    )
    return cfg, tcfg


def _train(rule: str, aux: str):
    cfg, tcfg = _configs(rule, aux)
    run = asae.Trainer(cfg, tcfg).fit(_data())
    state = {k: v.detach().clone() for k, v in run.sae.state_dict().items()}
    return state, run.history


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        comm = D.current_comm()
        assert comm.world == WORLD and comm.rank == rank
        # selection alone: each rank holds half of the rows of one matrix
        g = torch.Generator().manual_seed(3)
        P = torch.randn(40, 30, generator=g)
        half = P.shape[0] // WORLD
        mine = P[rank * half : (rank + 1) * half].contiguous()
        caps = torch.randint(0, P.shape[0] + 1, (P.shape[1],), generator=g)
        sel = {
            "mc": D.select_top_global(mine, 97, comm),
            "fc": D.select_columns_global(mine, caps, comm),
        }
        # whole training, every rule and auxiliary loss
        trained = {f"{r}/{a}": _train(r, a) for r, a in CASES}
        cfg, tcfg = _configs("topk", "none")
        try:
            asae.Trainer(cfg, asae.TrainConfig(batch_size=B - 1, total_tokens=B))
            uneven = ""
        except asae.ConfigError as err:
            uneven = str(err)
        # interrupted after a checkpoint at step 3 (rank 0 writes it), resumed later in one process
        cfg, tcfg = _configs("mutual_choice", "aux_zipf")
        tcfg = asae.TrainConfig(**{**tcfg.to_dict(), "checkpoint_every": 3})

        def stop(step, row):
            if step == 2:
                raise KeyboardInterrupt

        try:
            asae.Trainer(cfg, tcfg, f"{out_dir}/ckpt").fit(_data(), callback=stop)
        except KeyboardInterrupt:
            pass
        out = {"sel": sel, "trained": trained, "bytes": comm.bytes, "uneven": uneven}
        torch.save(out, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"{r}.pt", weights_only=False) for r in range(WORLD)]


def _global(idx: torch.Tensor, rank: int, half: int, F_: int) -> set[int]:
    return {int(i) + rank * half * F_ for i in idx}


def test_selection_equals_one_process(two_ranks):
    g = torch.Generator().manual_seed(3)
    P = torch.randn(40, 30, generator=g)
    caps = torch.randint(0, P.shape[0] + 1, (P.shape[1],), generator=g)
    half = P.shape[0] // WORLD
    for name, expected in (
        ("mc", select_mutual_choice(P, 97)),
        ("fc", select_feature_choice(P, caps)),
    ):
        got = set().union(*(_global(r["sel"][name], i, half, 30) for i, r in enumerate(two_ranks)))
        assert got == set(expected.tolist()), name


@pytest.mark.parametrize("rule,aux", CASES)
def test_training_equals_one_process(two_ranks, rule, aux):
    key = f"{rule}/{aux}"
    one_state, one_hist = _train(rule, aux)
    for rank in two_ranks:
        state, hist = rank["trained"][key]
        for name, value in one_state.items():
            torch.testing.assert_close(state[name], value, rtol=2e-4, atol=2e-5, msg=name)
        for col in ("nmse", "l0_mean", "dead_pct", "underutilised_pct"):
            torch.testing.assert_close(
                torch.tensor(hist[col].to_numpy()),
                torch.tensor(one_hist[col].to_numpy()),
                rtol=1e-3,
                atol=1e-4,
                msg=f"{key} {col}",
            )
    if get_rule(rule).uses_thresholds:
        assert torch.isfinite(one_state["thresholds"]).all()


def test_ranks_agree_and_communicate(two_ranks):
    a, b = two_ranks
    for key in a["trained"]:
        for name, value in a["trained"][key][0].items():
            assert torch.equal(value, b["trained"][key][0][name]), (key, name)
    assert a["bytes"] > 0 and b["bytes"] > 0
    assert "split evenly over 2 processes" in a["uneven"]


def test_two_rank_checkpoint_resumes_in_one_process(two_ranks, tmp_path_factory):
    ckpt = next(p for p in tmp_path_factory.getbasetemp().glob("ddp*/ckpt"))
    cfg, tcfg = _configs("mutual_choice", "aux_zipf")
    tcfg = asae.TrainConfig(**{**tcfg.to_dict(), "checkpoint_every": 3})
    resumed = asae.train(cfg, tcfg, _data(), resume_from=ckpt)
    whole = asae.train(cfg, tcfg, _data())
    for name, value in whole.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], value, rtol=2e-4, atol=2e-5)
