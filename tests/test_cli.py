"""The command line, as a user runs it: train, evaluate, export, compare, errors, torchrun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from adaptive_sae import cli
from adaptive_sae.sae import SparseAutoencoder

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    g = np.random.default_rng(0)
    mix = g.normal(size=(16, 16)).astype(np.float32)
    for name, n in (("train.npy", 4096), ("held.npy", 1024)):
        np.save(d / name, ((g.normal(size=(n, 16)) * g.random(16)) @ mix).astype(np.float32))
    return d


def _train_args(d: Path, out: Path, rule: str = "mutual_choice") -> list[str]:
    return [
        "train",
        "--data",
        str(d / "train.npy"),
        "--rule",
        rule,
        "--k",
        "4",
        "--n-features",
        "64",
        "--batch-size",
        "256",
        "--total-tokens",
        "4096",
        "--lr",
        "3e-3",
        "--out",
        str(out),
        "--quiet",
    ]


def test_train_evaluate_export(arrays, tmp_path, capsys):
    assert cli.main(_train_args(arrays, tmp_path / "sae")) == 0
    sae = SparseAutoencoder.load(tmp_path / "sae")
    assert sae.cfg.rule == "mutual_choice" and sae.cfg.n_features == 64 and sae.cfg.k == 4
    assert torch.isfinite(sae.thresholds).all()
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path / "sae"), "--data", str(arrays / "held.npy")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"train", "inference"}
    assert 0 < metrics["inference"]["nmse"] < 1 and metrics["train"]["n_tokens"] == 1024
    assert cli.main(["export", str(tmp_path / "sae"), str(tmp_path / "sl")]) == 0
    assert (tmp_path / "sl" / "cfg.json").exists()
    back = SparseAutoencoder.load(tmp_path / "sl")
    x = torch.from_numpy(np.load(arrays / "held.npy"))[:64]
    torch.testing.assert_close(
        back.reconstruct(x, mode="inference"),
        sae.reconstruct(x, mode="inference"),
        rtol=1e-4,
        atol=1e-4,
    )


def test_config_file_and_flags(arrays, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rule: topk\nk: 2\nn_features: 32\nbatch_size: 256\ntotal_tokens: 2048\n")
    args = ["train", "--data", str(arrays / "train.npy"), "--config", str(cfg), "--k", "3"]
    assert cli.main([*args, "--out", str(tmp_path / "sae"), "--quiet"]) == 0
    sae = SparseAutoencoder.load(tmp_path / "sae")
    assert sae.cfg.rule == "topk" and sae.cfg.k == 3 and sae.cfg.n_features == 32  # flag wins


def test_compare_prints_every_rule(arrays, tmp_path, capsys):
    args = [
        "compare",
        "--data",
        str(arrays / "train.npy"),
        "--held-out",
        str(arrays / "held.npy"),
        "--rules",
        "topk",
        "feature_choice",
        "--k",
        "4",
        "--n-features",
        "64",
        "--batch-size",
        "256",
        "--total-tokens",
        "2048",
        "--seeds",
        "0",
        "--lrs",
        "0.003",
        "--out",
        str(tmp_path / "rows.csv"),
        "--quiet",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "topk" in out and "feature_choice" in out
    assert (tmp_path / "rows.csv").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rule", "nope"], "rule='nope' is not known"),
        (["--batch-size", '"256"'], "batch_size"),
        (["--aux-loss", "bogus"], "aux_loss"),
    ],
)
def test_errors_name_the_field(arrays, tmp_path, capsys, args, message):
    base = _train_args(arrays, tmp_path / "sae")
    assert cli.main([*base, *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_data_file(tmp_path, capsys):
    args = ["train", "--data", str(tmp_path / "no.npy"), "--n-features", "8", "--out", "x"]
    assert cli.main(args) == 2
    assert "no.npy" in capsys.readouterr().err


def test_help_lists_field_docs():
    out = subprocess.run(
        [str(BIN / "adaptive-sae"), "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--aux-loss" in out and "underutilised" in out and "--n-features" in out


@pytest.mark.skipif(shutil.which(str(BIN / "torchrun")) is None, reason="torchrun not installed")
def test_torchrun_two_processes(arrays, tmp_path):
    cmd = [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        "29517",
        "-m",
        "adaptive_sae.cli",
        *_train_args(arrays, tmp_path / "ddp", rule="feature_choice"),
    ]
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    two = SparseAutoencoder.load(tmp_path / "ddp")
    assert cli.main(_train_args(arrays, tmp_path / "one", rule="feature_choice")) == 0
    one = SparseAutoencoder.load(tmp_path / "one")
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, rtol=5e-4, atol=5e-5)
