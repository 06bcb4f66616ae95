"""SAEBench's core evaluation (sae-bench 0.6.0, ``evals/core``) on the suite's SAEs of the small
language model, offline, beside the suite's own numbers on the same tokens.

SAEBench's driver (``evals.core.main.multiple_evals`` / its command line) downloads the model
(``HookedTransformer.from_pretrained_no_processing(sae.cfg.model_name)``) and the dataset
(``ActivationsStore.from_sae(dataset="Skylion007/openwebtext")`` -> ``datasets.load_dataset``),
so it cannot run offline. This script does what the driver does between those two downloads
(``general_utils.load_and_format_sae`` then ``run_evals``) with a locally built model and
activation store: the suite's tiny model rebuilt as a TransformerLens 3.x HookedTransformer
from its config and weights (checked against the suite's logits), and an ActivationsStore over an
in-memory pretokenized dataset of the suite's evaluation windows.

    # once: sae-bench without its heavy extras, beside the SAELens environment
    .venv-saelens/bin/pip install --no-deps --target .cache/saebench sae-bench==0.6.0 tabulate
    .venv/bin/python bench/saebench_core.py --tokens 100000      # writes bench/saebench_core.json

SAEBench's ``explained_variance`` (0.6.0, ``get_sparsity_and_variance_metrics``) is
1 - E||x - x̂||² / (E||x||² - (E||x||²/d)²): the "mean" it subtracts is the squared mean of
x_d² over dimensions, so it is in effect variance about zero, not about the mean; the suite's
NMSE is Σ||x - x̂||² / Σ||x - mean(x)||². Both are reported (with SAEBench's per-token
``explained_variance_legacy``). CE with the SAE spliced in, CE-loss score, L0 agree with the
suite's ``lm_eval.downstream_loss(first=0)`` on the same windows (bench/saebench_core.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_pre"


# ----- the suite's side (main environment) ---------------------------------------------------
def suite_side(a) -> int:
    import adaptive_sae as asae
    import torch
    from adaptive_sae import lm_eval
    from adaptive_sae.data import activation_source
    from safetensors.torch import save_file

    lm = None if a.lm_steps is None else {"steps": a.lm_steps}
    src = activation_source(
        "tiny", hook=HOOK, seed=0, cache=True, cache_tokens=a.tokens, model_cfg=lm
    )
    ctx = src.eval_contexts(a.contexts)  # (n, 128) byte windows of the validation split
    work = Path(tempfile.mkdtemp(prefix="saebench_"))
    model = src.model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "lm.st"))
    with torch.no_grad():
        logits = model(ctx[:4])
    save_file({"tokens": ctx.contiguous(), "logits": logits.contiguous()}, str(work / "ctx.st"))
    lm_cfg = src.lm.cfg.bridge_config()
    suite_rows = {}
    saes = []
    for rule in a.rules:
        cfg = asae.SAEConfig(d_in=src.d_in, n_features=a.features, rule=rule, k=a.k)
        tcfg = asae.TrainConfig(batch_size=1024, total_tokens=a.tokens, seed=0)
        sae = asae.train(cfg, tcfg, src).sae
        d = work / rule
        meta = {"context_size": ctx.shape[1], "prepend_bos": False}
        sae.save(d, format="saelens", hook_name=HOOK, model_name="tiny", metadata=meta)
        ds = lm_eval.downstream_loss(model, sae, ctx, HOOK, mode="inference", first=0)
        suite_rows[rule] = {
            "nmse": ds["nmse_inference"],
            "l0": ds["l0_inference"],
            "ce_clean": ds["ce_clean"],
            "ce_sae": ds["ce_sae_inference"],
            "ce_zero": ds["ce_zero"],
            "loss_recovered_zero": ds["loss_recovered_zero_inference"],
        }
        saes.append({"name": rule, "dir": str(d)})
    job = {"lm": str(work / "lm.st"), "lm_cfg": lm_cfg, "ctx": str(work / "ctx.st")}
    job |= {"saes": saes, "out": str(work / "saebench.json"), "batch": a.batch}
    (work / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=str(ROOT / ".cache" / "saebench"))
    py = ROOT / ".venv-saelens" / "bin" / "python"
    r = subprocess.run([str(py), __file__, "--saelens-side", str(work / "job.json")], env=env)
    if r.returncode:
        return r.returncode
    theirs = json.loads((work / "saebench.json").read_text())
    params = {k: v for k, v in vars(a).items() if k not in ("out", "saelens_side")}
    out = {"params": params, "suite": suite_rows, "saebench": theirs}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


# ----- SAEBench's side (SAELens environment + sae-bench) --------------------------------------
def _hooked_transformer(cfg: dict, state: dict):
    """The suite's native TL 4 model as a TL 3 HookedTransformer (same computation)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    H, dh, d = cfg["n_heads"], cfg["d_head"], cfg["d_model"]
    ht = HookedTransformer(
        HookedTransformerConfig(
            n_layers=cfg["n_layers"],
            d_model=d,
            d_head=dh,
            n_heads=H,
            d_mlp=cfg["d_mlp"],
            n_ctx=cfg["n_ctx"],
            d_vocab=cfg["d_vocab"],
            act_fn=cfg["act_fn"],
            normalization_type="LN",
            positional_embedding_type="standard",
            default_prepend_bos=False,
        )
    )
    sd = {
        "embed.W_E": state["embed.weight"],
        "pos_embed.W_pos": state["pos_embed.weight"],
        "ln_final.w": state["ln_final.weight"],
        "ln_final.b": state["ln_final.bias"],
        "unembed.W_U": state["unembed.weight"].T,
        "unembed.b_U": state["unembed.bias"],
    }
    for i in range(cfg["n_layers"]):
        p, q = f"blocks.{i}.", f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[q + ln + ".w"] = state[p + ln + ".weight"]
            sd[q + ln + ".b"] = state[p + ln + ".bias"]
        for x in ("q", "k", "v"):  # Linear (H·dh, d) -> (H, d, dh)
            sd[q + f"attn.W_{x.upper()}"] = (
                state[p + f"attn.{x}.weight"].view(H, dh, d).transpose(1, 2)
            )
            sd[q + f"attn.b_{x.upper()}"] = state[p + f"attn.{x}.bias"].view(H, dh)
        sd[q + "attn.W_O"] = state[p + "attn.o.weight"].T.reshape(H, dh, d)
        sd[q + "attn.b_O"] = state[p + "attn.o.bias"]
        sd[q + "mlp.W_in"] = state[p + "mlp.in.weight"].T
        sd[q + "mlp.b_in"] = state[p + "mlp.in.bias"]
        sd[q + "mlp.W_out"] = state[p + "mlp.out.weight"].T
        sd[q + "mlp.b_out"] = state[p + "mlp.out.bias"]
    missing, unexpected = ht.load_state_dict(
        {k: v.contiguous() for k, v in sd.items()}, strict=False
    )
    params = {n for n, _ in ht.named_parameters()}
    assert not (params & set(missing)) and not unexpected, (missing, unexpected)
    ht.eval()
    return ht.to(torch.float32)


def saelens_side(job_path: str) -> int:
    import torch
    from datasets import Dataset
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.main import run_evals
    from sae_bench.sae_bench_utils import general_utils
    from sae_lens import SAE
    from sae_lens.training.activations_store import ActivationsStore
    from safetensors.torch import load_file

    job = json.loads(Path(job_path).read_text())
    model = _hooked_transformer(job["lm_cfg"], load_file(job["lm"]))
    ctx = load_file(job["ctx"])
    tokens = ctx["tokens"]
    with torch.no_grad():
        logit_diff = float((model(tokens[:4]) - ctx["logits"]).abs().max())
    assert logit_diff < 1e-3, f"the rebuilt model differs from the suite's: {logit_diff}"
    n, T = tokens.shape
    batch = int(job["batch"])
    res = {"model_logit_max_abs_diff": logit_diff}
    for spec in job["saes"]:
        sae = SAE.load_from_disk(spec["dir"], device="cpu")
        _, sae, _ = general_utils.load_and_format_sae(f"adaptive_sae_{spec['name']}", sae, "cpu")
        ds = Dataset.from_dict({"tokens": tokens.tolist()})
        store = ActivationsStore.from_sae(
            model,
            sae,
            dataset=ds,
            context_size=T,
            store_batch_size_prompts=batch,
            streaming=False,
            disable_concat_sequences=True,
        )
        n_batches = n // batch
        cfg = CoreEvalConfig(
            model_name="tiny",
            batch_size_prompts=batch,
            n_eval_reconstruction_batches=n_batches,
            n_eval_sparsity_variance_batches=n_batches,
            dataset="local",
            context_size=T,
            compute_kl=True,
            compute_ce_loss=True,
            compute_l2_norms=True,
            compute_sparsity_metrics=True,
            compute_variance_metrics=True,
            compute_featurewise_density_statistics=True,
            compute_featurewise_weight_based_metrics=False,
        )
        scalars, features = run_evals(sae, store, model, cfg)
        density = torch.as_tensor(features["feature_density"])
        scalars["feature_density"] = {
            "frac_alive": float((density > 0).float().mean()),
            "frac_above_1pct": float((density > 0.01).float().mean()),
            "frac_above_10pct": float((density > 0.1).float().mean()),
        }
        res[spec["name"]] = scalars
    Path(job["out"]).write_text(json.dumps(res, indent=2, default=float))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rules", nargs="+", default=["topk", "mutual_choice", "feature_choice_zipf"])
    p.add_argument("--tokens", type=int, default=100_000, help="training tokens per SAE")
    p.add_argument("--lm-steps", type=int, default=None, help="tiny LM steps (default: its own)")
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--k", type=float, default=8.0)
    p.add_argument("--contexts", type=int, default=64, help="evaluation windows of 128 bytes")
    p.add_argument("--batch", type=int, default=16, help="windows per SAEBench batch")
    p.add_argument("--out", default=str(ROOT / "bench" / "saebench_core.json"))
    p.add_argument("--saelens-side", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    return saelens_side(a.saelens_side) if a.saelens_side else suite_side(a)


if __name__ == "__main__":
    sys.exit(main())
