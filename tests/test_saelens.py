"""SAELens 6.x export and import (DESIGN §13), checked against the real SAELens.

SAELens needs transformer-lens<4 and the suite 4.x, so SAELens runs in its own environment
(.venv-saelens, created by `make saelens-venv`, which `make test` runs first) through
tests/saelens_side.py. Without that environment these tests fail and say how to create it;
SKIP_SAELENS=1 skips them instead. The tests of the suite's side alone always run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import adaptive_sae as asae
import pytest
import torch
from adaptive_sae import saelens
from adaptive_sae.config import ConfigError
from adaptive_sae.rules import rule_names
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SAELENS_VENV = ROOT / ".venv-saelens"
SIDE = ROOT / "tests" / "saelens_side.py"
SKIP_VAR = "SKIP_SAELENS"
TOL = 1e-5
D, F = 16, 64


def _data(n, seed, scale=0.25):
    """Sparse mixtures of 64 directions, scaled so the global input scale is far from 1 while
    values stay of order 1 (the 1e-5 tolerance is absolute)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    acts = (torch.rand(n, 64, generator=g) < 0.06) * torch.rand(n, 64, generator=g)
    return scale * (acts @ feats + 0.05 * torch.randn(n, D, generator=g))


def _trained(rule):
    cfg = asae.SAEConfig(d_in=D, n_features=F, rule=rule, k=4)
    tcfg = asae.TrainConfig(batch_size=128, total_tokens=128 * 16, lr=3e-3, log_every=8)
    sae = asae.train(cfg, tcfg, _data(2048, seed=0)).sae
    assert abs(float(sae.input_scale) - 1) > 0.2  # a scale far from 1, so folding matters
    return sae


@torch.no_grad()
def _random(rule, input_scaling, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = asae.SAEConfig(d_in=D, n_features=F, rule=rule, k=4, input_scaling=input_scaling)
    sae = asae.SparseAutoencoder(cfg, generator=g)
    sae.b_enc.copy_(0.3 * torch.randn(F, generator=g))
    sae.b_dec.copy_(0.5 * torch.randn(D, generator=g))
    if input_scaling == "global":
        sae.input_scale.fill_(0.37)
    if rule == "mutual_choice":
        sae.thresholds.fill_(0.8)
    elif rule.startswith("feature_choice"):
        sae.thresholds.copy_(1.5 * torch.rand(F, generator=g))
    return sae


def _suite_saes():
    """An SAE of every rule (trained, global scaling) and random ones for the other scalings."""
    saes = {r: _trained(r) for r in rule_names(aliases=True)}
    saes["topk_per_token"] = _random("topk", "per_token", 1)
    saes["feature_choice_per_token"] = _random("feature_choice", "per_token", 2)
    saes["mutual_choice_none"] = _random("mutual_choice", "none", 3)
    saes["relu_l1_per_token"] = _random("relu_l1", "per_token", 4)
    saes["mutual_choice_global"] = _random("mutual_choice", "global", 5)
    return saes


EXPECTED_ARCH = {
    "topk": "topk",
    "mutual_choice": "jumprelu",
    "batch_topk": "jumprelu",
    "feature_choice": "jumprelu",
    "feature_choice_zipf": "jumprelu",
    "relu_l1": "standard",
}


@pytest.fixture(scope="module")
def suite_saes():
    return _suite_saes()


@pytest.fixture(scope="module")
def saelens_python():
    if os.environ.get(SKIP_VAR):
        pytest.skip(f"{SKIP_VAR} is set: the round trip through the real SAELens is not checked.")
    py = SAELENS_VENV / "bin" / "python"
    if not (py.exists() and any(SAELENS_VENV.glob(".installed-*"))):
        pytest.fail(
            f"The SAELens environment {SAELENS_VENV.name}/ is missing or incomplete; create it "
            f"with `make saelens-venv` (`make test` does it first; it needs PyPI once), or set "
            f"{SKIP_VAR}=1 to skip the SAELens round trip."
        )
    return py


def _run_side(py, tmp_path, x, load=(), create=()):
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    job = {
        "inputs": str(tmp_path / "x.safetensors"),
        "out": str(tmp_path / "out.safetensors"),
        "report": str(tmp_path / "report.json"),
        "load": list(load),
        "create": list(create),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = subprocess.run(
        [str(py), str(SIDE), str(tmp_path / "job.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"the SAELens side failed:\n{r.stdout}\n{r.stderr}"
    return load_file(job["out"]), json.loads(Path(job["report"]).read_text())


def _max_diff(a, b):
    return float((a.detach() - b).abs().max())


# ----- against the real SAELens --------------------------------------------------------------
def test_every_rule_loads_in_saelens_with_the_same_codes(suite_saes, saelens_python, tmp_path):
    x = _data(256, seed=1)  # tokens never seen in training: no affinity sits on a threshold
    load = []
    for name, sae in suite_saes.items():
        density = torch.linspace(0.0, 0.5, F) if name == "topk" else None
        sae.save(tmp_path / name, format="saelens", feature_density=density, hook_name="h")
        load.append({"name": name, "dir": str(tmp_path / name)})
    out, report = _run_side(saelens_python, tmp_path, x, load=load)
    diffs = {}
    for name, sae in suite_saes.items():
        codes, recon = sae.encode(x, "inference"), sae.reconstruct(x, "inference")
        assert (codes != 0).any() and (codes == 0).any(), name  # a sparse code, not a trivial one
        diffs[name] = (
            _max_diff(codes, out[f"{name}.codes"]),
            _max_diff(recon, out[f"{name}.recon"]),
        )
        assert diffs[name][0] < TOL and diffs[name][1] < TOL, (name, diffs[name])
        got = report["saes"][name]
        assert got["architecture"] == EXPECTED_ARCH[sae.cfg.rule], name
        want_norm = "constant_norm_rescale" if sae.cfg.input_scaling == "per_token" else "none"
        assert got["normalize_activations"] == want_norm, name
        if sae.cfg.rule == "topk":
            assert got["k"] == int(sae.cfg.k)
    assert report["saes"]["mutual_choice"]["class"] == "JumpReLUSAE"
    want = torch.log10(torch.linspace(0.0, 0.5, F) + 1e-10)
    assert torch.allclose(torch.tensor(report["saes"]["topk"]["sparsity"]), want)
    print(f"SAELens {report['sae_lens_version']}: max |codes|, |recon| differences {diffs}")


SAELENS_MADE = [
    {"name": "topk", "arch": "topk", "k": 5},
    {"name": "topk_rescaled", "arch": "topk", "k": 7, "rescale_acts_by_decoder_norm": True},
    {"name": "jumprelu", "arch": "jumprelu"},
    {
        "name": "jumprelu_normed",
        "arch": "jumprelu",
        "normalize_activations": "constant_norm_rescale",
    },
    {"name": "standard", "arch": "standard"},
    {"name": "standard_no_b_dec_in", "arch": "standard", "apply_b_dec_to_input": False},
]
RULE_FOR = {"topk": "topk", "jumprelu": "feature_choice", "standard": "relu_l1"}


def test_saes_saved_by_saelens_load_with_the_same_codes(saelens_python, tmp_path):
    x = _data(256, seed=2, scale=1.0)
    create = [
        {**spec, "dir": str(tmp_path / spec["name"]), "d_in": D, "d_sae": F, "seed": i}
        for i, spec in enumerate(SAELENS_MADE)
    ]
    out, _ = _run_side(saelens_python, tmp_path, x, create=create)
    diffs = {}
    for spec in SAELENS_MADE:
        name = spec["name"]
        sae = asae.SparseAutoencoder.load(tmp_path / name)  # detects the SAELens folder
        assert sae.cfg.rule == RULE_FOR[spec["arch"]], name
        codes, recon = sae.encode(x, "inference"), sae.reconstruct(x, "inference")
        assert (out[f"{name}.codes"] != 0).any() and (out[f"{name}.codes"] == 0).any(), name
        diffs[name] = (
            _max_diff(codes, out[f"{name}.codes"]),
            _max_diff(recon, out[f"{name}.recon"]),
        )
        assert diffs[name][0] < TOL and diffs[name][1] < TOL, (name, diffs[name])
    print(f"SAELens-made SAEs, max |codes|, |recon| differences {diffs}")


# ----- the suite's side ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule, scaling",
    [
        ("topk", "global"),
        ("mutual_choice", "global"),
        ("feature_choice_zipf", "per_token"),
        ("relu_l1", "none"),
    ],
)
def test_export_reimports_as_the_same_sae(rule, scaling, tmp_path):
    sae = _random(rule, scaling, seed=7)
    x = _data(64, seed=3)
    sae.save(tmp_path / "sl", format="saelens")
    assert sorted(p.name for p in (tmp_path / "sl").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    back = asae.SparseAutoencoder.load(tmp_path / "sl")
    assert back.cfg == sae.cfg
    assert math.isclose(float(back.input_scale), float(sae.input_scale), rel_tol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(back, name), getattr(sae, name), atol=1e-6), name
    assert torch.allclose(back.encode(x, "inference"), sae.encode(x, "inference"), atol=TOL)
    assert torch.allclose(back.reconstruct(x), sae.reconstruct(x), atol=TOL)


def test_global_scale_is_folded_into_the_weights(tmp_path):
    sae = _random("topk", "global", seed=8)
    saelens.save_saelens(
        sae, tmp_path / "sl", hook_name="blocks.1.hook_resid_pre", metadata={"context_size": 128}
    )
    meta = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_pre" and meta["context_size"] == 128
    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    s = float(sae.input_scale)
    assert torch.allclose(w["W_enc"], sae.W_enc * s)
    assert torch.allclose(w["W_dec"], sae.W_dec / s)
    assert torch.allclose(w["b_dec"], sae.b_dec / s)
    assert torch.equal(w["b_enc"], sae.b_enc.detach())
    assert set(w) == {"W_enc", "b_enc", "W_dec", "b_dec"}


def _strip_suite_metadata(folder):
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"][saelens.SUITE_KEY]
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "rule, arch_rule", [("mutual_choice", "feature_choice"), ("relu_l1", "relu_l1")]
)
def test_a_foreign_folder_maps_architecture_to_rule(rule, arch_rule, tmp_path):
    sae = _random(rule, "global", seed=9)
    x = _data(64, seed=4)
    sae.save(tmp_path / "sl", format="saelens")
    _strip_suite_metadata(tmp_path / "sl")
    back = saelens.load_saelens(tmp_path / "sl")
    assert back.cfg.rule == arch_rule and back.cfg.input_scaling == "none"
    assert float(back.input_scale) == 1.0
    if rule == "mutual_choice":  # the global θ on every feature, now per-feature thresholds
        assert torch.allclose(back.thresholds, torch.full((F,), 0.8))
    assert torch.allclose(back.encode(x, "inference"), sae.encode(x, "inference"), atol=TOL)
    assert torch.allclose(back.reconstruct(x), sae.reconstruct(x), atol=TOL)


def test_untrained_thresholds_are_refused(tmp_path):
    sae = asae.SparseAutoencoder(asae.SAEConfig(d_in=D, n_features=F, rule="feature_choice"))
    with pytest.raises(ValueError, match="no inference thresholds yet.*train it first"):
        sae.save(tmp_path / "sl", format="saelens")
    assert not (tmp_path / "sl").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_export_replaces_an_earlier_export_but_not_other_files(tmp_path):
    a, b = _random("topk", "global", seed=10), _random("topk", "global", seed=11)
    a.save(tmp_path / "sl", format="saelens", feature_density=torch.full((F,), 0.1))
    b.save(tmp_path / "sl", format="saelens")
    assert torch.allclose(saelens.load_saelens(tmp_path / "sl").W_enc, b.W_enc, atol=1e-6)
    assert not (tmp_path / "sl" / "sparsity.safetensors").exists()  # the whole folder replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sl"]
    (tmp_path / "sl" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds other files.*notes.txt"):
        a.save(tmp_path / "sl", format="saelens")
    assert (tmp_path / "sl" / "notes.txt").read_text() == "mine"


def test_feature_density_round_trip_and_shape_check(tmp_path):
    sae = _random("relu_l1", "none", seed=12)
    density = torch.linspace(1e-4, 0.3, F)
    sae.save(tmp_path / "sl", format="saelens", feature_density=density)
    assert torch.allclose(saelens.load_feature_density(tmp_path / "sl").float(), density)
    with pytest.raises(ValueError, match=r"feature_density has shape \(3,\); expected \(64,\)"):
        sae.save(tmp_path / "sl2", format="saelens", feature_density=torch.ones(3))


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(architecture="gated"), "architecture='gated' is not supported"),
        (dict(normalize_activations="layer_norm"), "normalize_activations='layer_norm'"),
        (dict(reshape_activations="hook_z"), "reshape_activations='hook_z'"),
        (dict(metadata={}), "not in SAELens 6.x format"),
        (dict(d_sae=65), "d_sae=65 but W_enc is 16x64"),
    ],
)
def test_unsupported_saelens_folders_are_refused_clearly(changes, match, tmp_path):
    _random("topk", "none", seed=13).save(tmp_path / "sl", format="saelens")
    _edit_cfg(tmp_path / "sl", **changes)
    with pytest.raises(ConfigError, match=match):
        saelens.load_saelens(tmp_path / "sl")


def test_not_a_saelens_folder_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a SAELens SAE folder"):
        saelens.load_saelens(tmp_path)
    with pytest.raises(FileNotFoundError, match="sae.safetensors is missing"):
        asae.SparseAutoencoder.load(tmp_path)
    with pytest.raises(ValueError, match="format='onnx' is not known"):
        _random("topk", "none", seed=14).save(tmp_path / "x", format="onnx")
