"""The SAELens side of tests/test_saelens.py; runs in the SAELens environment (.venv-saelens),
never in the suite's, and imports nothing of the suite.

    python tests/saelens_side.py JOB.json

JOB.json: {"inputs": x.safetensors (tensor "x", (N, d)), "out": out.safetensors,
"report": report.json, "load": [{"name", "dir"}], "create": [{"name", "dir", "arch", "d_in",
"d_sae", "seed", and optional "k", "normalize_activations", "apply_b_dec_to_input",
"rescale_acts_by_decoder_norm"}]}.

load: ``SAE.load_from_disk`` each folder, encode and decode the inputs. create: build a SAELens
SAE of that architecture with random weights (and thresholds), ``save_model`` it, and encode and
decode the inputs. Codes and reconstructions go to ``out`` as "<name>.codes" / "<name>.recon";
what SAELens made of each folder (class, architecture, config fields, sparsity) to ``report``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import sae_lens
import torch
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from safetensors.torch import load_file, save_file


def _random_sae(spec: dict):
    g = torch.Generator().manual_seed(int(spec["seed"]))
    d, F = int(spec["d_in"]), int(spec["d_sae"])
    common = dict(
        d_in=d,
        d_sae=F,
        normalize_activations=spec.get("normalize_activations", "none"),
        apply_b_dec_to_input=spec.get("apply_b_dec_to_input", True),
    )
    arch = spec["arch"]
    if arch == "topk":
        sae = TopKSAE(
            TopKSAEConfig(
                k=int(spec["k"]),
                rescale_acts_by_decoder_norm=spec.get("rescale_acts_by_decoder_norm", False),
                **common,
            )
        )
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    elif arch == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    with torch.no_grad():
        # decoder rows of norms 0.5-1.5, so nothing relies on unit-norm rows
        norms = 0.5 + torch.rand(F, 1, generator=g)
        sae.W_dec.copy_(torch.randn(F, d, generator=g) / d**0.5 * norms)
        sae.W_enc.copy_(torch.randn(d, F, generator=g) / d**0.5)
        sae.b_enc.copy_(0.3 * torch.randn(F, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(d, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.6 * torch.rand(F, generator=g))
    return sae


def _describe(sae, folder: Path) -> dict:
    cfg = sae.cfg
    out = {
        "class": type(sae).__name__,
        "architecture": cfg.architecture(),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "normalize_activations": cfg.normalize_activations,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "k": getattr(cfg, "k", None),
        "params": sorted(name for name, _ in sae.named_parameters()),
    }
    sparsity = folder / "sparsity.safetensors"
    if sparsity.is_file():
        out["sparsity"] = load_file(str(sparsity))["sparsity"].tolist()
    return out


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    x = load_file(job["inputs"])["x"].float()
    tensors, report = {}, {"sae_lens_version": sae_lens.__version__, "saes": {}}
    work = [(spec, False) for spec in job.get("load", [])]
    work += [(spec, True) for spec in job.get("create", [])]
    for spec, create in work:
        folder = Path(spec["dir"])
        if create:
            _random_sae(spec).save_model(folder)
        sae = SAE.load_from_disk(folder, device="cpu")  # what a user of SAELens gets
        sae.eval()
        with torch.no_grad():
            codes = sae.encode(x)
            recon = sae.decode(codes)
        tensors[f"{spec['name']}.codes"] = codes.contiguous()
        tensors[f"{spec['name']}.recon"] = recon.contiguous()
        report["saes"][spec["name"]] = _describe(sae, folder)
    save_file(tensors, job["out"])
    Path(job["report"]).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
