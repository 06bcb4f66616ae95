"""The command line: ``adaptive-sae train | evaluate | export | compare | sweep``.

    adaptive-sae train --source synthetic --rule mutual_choice --k 8 --n-features 512 \\
        --total-tokens 1000000 --out my_sae
    adaptive-sae evaluate my_sae --source synthetic --tokens 16384
    adaptive-sae export my_sae my_sae_saelens --format saelens
    adaptive-sae compare --source synthetic --rules topk mutual_choice --k 8 --n-features 512
    adaptive-sae sweep papermill_runs/sparsity_allocation.yaml
    torchrun --nproc-per-node 2 -m adaptive_sae.cli train --data acts.npy --rule mutual_choice ...

Every field of ``SAEConfig`` and ``TrainConfig`` is a flag (``--n-features``, ``--aux-loss``...),
with its documentation as help; ``--config FILE`` (JSON or YAML, both configs' fields in one
mapping) sets them too, and flags win. Data comes from ``--data FILE`` (an (N, d) array in .npy
or .pt) or ``--source NAME`` with ``--source-arg key=value`` (``synthetic``, ``tiny``, ``hf``,
``gpt2``). Errors are the library's: they name the field or file and the fix.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, SAEConfig, TrainConfig


def _field_docs(cls) -> dict[str, str]:
    """The one-line docstrings under each dataclass field (read from the source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr):
            if isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _parse_value(text: str) -> Any:
    """A flag's text as JSON when it parses (numbers, booleans, lists, null), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _add_config_flags(p: argparse.ArgumentParser, cls, skip=()) -> None:
    docs = _field_docs(cls)
    group = p.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else "required"
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_parse_value,
            default=None,
            help=f"{docs.get(f.name, '')} (default: {default})",
        )


def _read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    text = Path(path).read_text()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:
        raise ConfigError(f"{path} is not valid JSON/YAML ({err}); fix the file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of SAEConfig/TrainConfig fields.")
    return data


def _configs(a: argparse.Namespace, d_in: int) -> tuple[SAEConfig, TrainConfig]:
    values = _read_config_file(a.config)
    for cls in (SAEConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if getattr(a, f.name, None) is not None:
                values[f.name] = getattr(a, f.name)
    sae_names = {f.name for f in dataclasses.fields(SAEConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - sae_names - train_names
    if unknown:
        raise ConfigError(f"unknown fields {sorted(unknown)} in {a.config}; see --help.")
    values.setdefault("d_in", d_in)
    if int(values["d_in"]) != d_in:
        raise ConfigError(f"d_in={values['d_in']} but the data has dimension {d_in}.")
    if "n_features" not in values:
        raise ConfigError("--n-features is required (the dictionary width F).")
    cfg = SAEConfig(**{k: v for k, v in values.items() if k in sae_names})
    tcfg = TrainConfig(**{k: v for k, v in values.items() if k in train_names})
    return cfg, tcfg


def _source_args(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--source-arg {pair!r} must read key=value.")
        key, value = pair.split("=", 1)
        out[key] = _parse_value(value)
    return out


def _load_array(path: str):
    import numpy as np
    import torch

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data {path}: no such file.")
    try:
        x = torch.load(p, weights_only=True) if p.suffix == ".pt" else torch.from_numpy(np.load(p))
    except Exception as err:
        raise ConfigError(f"--data {path} could not be read ({err}); pass .npy or .pt.") from None
    if x.ndim != 2:
        raise ConfigError(f"--data {path} has shape {tuple(x.shape)}; expected (N, d).")
    return x.float()


def _data(a: argparse.Namespace):
    """(training data, held-out tensor or None, source or None)."""
    if bool(a.data) == bool(a.source):
        raise ConfigError("pass exactly one of --data FILE or --source NAME.")
    if a.data:
        x = _load_array(a.data)
        held = _load_array(a.held_out) if getattr(a, "held_out", None) else None
        return x, held, None
    from .data import activation_source

    src = activation_source(a.source, **_source_args(a.source_arg))
    return src, None, src


def _add_data_flags(p: argparse.ArgumentParser, held_out: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help="an (N, d) array of activations (.npy or .pt)")
    if held_out:
        g.add_argument("--held-out", help="held-out activations (.npy or .pt) for evaluation")
    g.add_argument("--source", help="an activation source: synthetic, tiny, hf, gpt2")
    g.add_argument(
        "--source-arg",
        action="append",
        metavar="KEY=VALUE",
        help="a source parameter (repeatable), e.g. d_in=64 or model=path/to/model",
    )


def _init_distributed() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPUs, NCCL on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def cmd_train(a: argparse.Namespace) -> int:
    from .trainer import train

    _init_distributed()
    data, _, _ = _data(a)
    d_in = int(data.shape[1]) if hasattr(data, "shape") else int(data.d_in)
    cfg, tcfg = _configs(a, d_in)
    run = train(
        cfg,
        tcfg,
        data,
        checkpoint_dir=a.checkpoint_dir,
        resume_from=a.resume,
        progress=not a.quiet,
    )
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        run.sae.save(a.out)
        last = run.history.iloc[-1].to_dict() if len(run.history) else {}
        print(json.dumps({"saved": str(a.out), **{k: last.get(k) for k in ("nmse", "l0_mean")}}))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .metrics import evaluate
    from .sae import SparseAutoencoder

    sae = SparseAutoencoder.load(a.sae)
    if a.data:
        x = _load_array(a.data)
    elif a.source:
        from .data import activation_source

        x = activation_source(a.source, **_source_args(a.source_arg)).held_out(a.tokens)
    else:
        raise ConfigError("pass --data FILE (held-out activations) or --source NAME.")
    modes = ["train", "inference"] if a.mode == "both" else [a.mode]
    out = {m: evaluate(sae, x, mode=m).scalars() for m in modes}
    print(json.dumps(out, indent=2))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .sae import SparseAutoencoder

    sae = SparseAutoencoder.load(a.sae)
    path = sae.save(a.out, format=a.format)
    print(f"wrote {path} ({a.format})")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from . import convergence

    data, held, src = _data(a)
    if src is not None:
        train_x, held_x = src, src
    else:
        if held is None:
            raise ConfigError("compare on --data needs --held-out FILE for the evaluation.")
        train_x, held_x = data, held
    conv = convergence.converge(
        train_x,
        held_x,
        rules=a.rules,
        k=a.k,
        n_features=a.n_features,
        batch_size=a.batch_size,
        seeds=a.seeds,
        max_tokens=a.total_tokens,
        start_tokens=min(a.total_tokens, a.start_tokens),
        lrs=a.lrs,
        eval_tokens=a.eval_tokens,
        log=None if a.quiet else print,
    )
    metrics = ["nmse", "nmse_inference", "l0_mean", "dead_pct"]
    table = convergence.mean_std_text(conv.table, metrics)
    cols = [*metrics, "lr", "lr_below", "lr_above", "tokens", "converged"]
    print(table[["rule", *[c for c in cols if c in table]]].to_string(index=False))
    if a.out:
        from .io import write_csv

        write_csv(a.out, conv.runs)
        print(f"per-seed rows written to {a.out}")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from . import sweep

    return int(sweep.main(a.args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaptive-sae",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train one SAE (data-parallel under torchrun)",
        description="Train one SAE and save it (safetensors + cfg.json). Under torchrun every "
        "process trains its share of each global batch and rank 0 saves.",
    )
    _add_data_flags(t)
    t.add_argument("--config", help="JSON or YAML mapping of SAEConfig/TrainConfig fields")
    t.add_argument("--out", required=True, help="folder to save the trained SAE in")
    t.add_argument("--checkpoint-dir", help="write resumable checkpoints here")
    t.add_argument("--resume", help="continue the run whose checkpoints are in this folder")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(t, SAEConfig, skip=("d_in",))
    _add_config_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="NMSE, L0, dead and underutilised features of a saved SAE")
    e.add_argument("sae", help="a folder written by train/save, or a SAELens folder")
    e.add_argument("--data", help="held-out activations (.npy or .pt)")
    e.add_argument("--source", help="or a source whose held-out tokens to use")
    e.add_argument("--source-arg", action="append", metavar="KEY=VALUE")
    e.add_argument("--tokens", type=int, default=16384, help="held-out tokens from --source")
    e.add_argument("--mode", choices=["train", "inference", "both"], default="both")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="write a saved SAE in another format (SAELens)")
    x.add_argument("sae")
    x.add_argument("out")
    x.add_argument("--format", choices=["saelens", "suite"], default="saelens")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser(
        "compare",
        help="train every rule until the comparison converges and compare them",
        description="adaptive_sae.compare_rules: each rule's learning rate bracketed (the "
        "grid extended past an edge), the budget doubled from --start-tokens until no rule's "
        "held-out NMSE moves by more than 1 %% or --total-tokens is reached, every seed on "
        "test tokens (mean ± std).",
    )
    _add_data_flags(c, held_out=True)
    c.add_argument("--rules", nargs="+", default=["topk", "mutual_choice", "feature_choice_zipf"])
    c.add_argument("--k", type=float, default=8)
    c.add_argument("--n-features", type=int, required=True)
    c.add_argument("--batch-size", type=int, default=1024)
    c.add_argument("--total-tokens", type=int, default=8_388_608, help="the largest budget")
    c.add_argument("--start-tokens", type=int, default=131_072, help="the first budget")
    c.add_argument("--eval-tokens", type=int, default=16384)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    c.add_argument("--out", help="CSV of the per-seed rows at each rule's best learning rate")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("sweep", help="run papermill sweeps (python -m adaptive_sae.sweep)")
    s.add_argument("args", nargs=argparse.REMAINDER, help="the sweep runner's arguments")
    s.set_defaults(func=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"adaptive-sae {a.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
