"""The embedded language model (DESIGN §7.2): a small byte-level TransformerLens model, trained
by the suite on the standard-library corpus (corpus.py), cached, and read at a hook.

The model is a TL-native transformer built with ``TransformerBridge.boot_native`` (pre-LN,
learned positions, GELU MLP, vocabulary = the 256 byte values). Training is seeded and
resumable: batch ``s`` is drawn from a generator seeded by (seed, s), and a checkpoint (model,
optimiser, step) is written atomically every ``checkpoint_every`` steps, so an interrupted run
continues where it stopped. The trained weights go to ``<cache>/tiny_lm/<key>/`` with a JSON
record (config, corpus hash, validation loss, training time); ``key`` hashes the config and the
corpus, so a different Python (another corpus) trains its own model, and a present model is
reused; a lock file beside the folder lets one process train it while the others wait (sweep
points that start together on a fresh cache). ``python -m adaptive_sae.data.tiny [--retrain]``
trains (or loads) it and prints samples.

Validation loss is measured on non-overlapping ``n_ctx``-byte windows of the validation split;
every byte after the first of each window is predicted; bits per byte = nats / ln 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file

from ..config import ConfigError, _JsonMixin
from ..io import save_tensors
from .corpus import DOC_START, VOCAB_SIZE, Corpus, Split, build_corpus
from .store import ActivationStore, StoreConfig, atomic_write_json, cache_root, short_hash

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "model.json"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TinyLMConfig(_JsonMixin):
    """Architecture and training recipe of the embedded model.

    The defaults (2 blocks, width 128, 1600 steps of 32 windows of 128 bytes, 6.5 M bytes seen)
    were picked from a sweep of width, depth, batch and steps: they reach 2.18 bits per byte on
    the validation split (a unigram byte model: 4.84, a bigram model: 3.97) in about five
    minutes on two idle CPU cores (0.19 s per step measured); 2000 steps reach 2.15.
    """

    d_model: int = 128
    """Width of the residual stream (the d_in of SAEs trained on it)."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block (d_head = d_model / n_heads)."""
    d_mlp: int = 512
    """Hidden width of each MLP."""
    n_ctx: int = 128
    """Context length in bytes (training windows and the longest input)."""
    act_fn: str = "gelu"
    """MLP activation."""
    steps: int = 1600
    """Optimiser steps (about five minutes on two uncontended CPU cores)."""
    batch_size: int = 32
    """Windows per step (batch_size * n_ctx bytes)."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    decay_fraction: float = 0.3
    """Fraction of steps at the end with a linear decay to 0."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""
    seed: int = 0
    """Seed of the initialisation and of the batch order."""
    val_fraction: float = 0.1
    """Fraction of documents (by hash of their name) in the validation split."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints."""

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_mlp", "n_ctx", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer.")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"pick n_heads among the divisors of d_model."
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr} must be a positive finite number.")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction={self.decay_fraction} must be in [0, 1].")
        if self.n_ctx < 2:
            raise ConfigError(f"n_ctx={self.n_ctx} must be >= 2 to predict anything.")

    def bridge_config(self) -> dict[str, Any]:
        """The TransformerBridgeConfig fields for boot_native."""
        return {
            "d_model": self.d_model,
            "d_head": self.d_model // self.n_heads,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "d_mlp": self.d_mlp,
            "n_ctx": self.n_ctx,
            "d_vocab": VOCAB_SIZE,
            "act_fn": self.act_fn,
            "normalization_type": "LN",
            "positional_embedding_type": "standard",
            "init_mode": "gpt2",
            "seed": self.seed,
            "model_name": "adaptive_sae-tiny-byte-lm",
            "tokenizer_prepends_bos": False,
            "default_prepend_bos": False,
        }

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to 0 over the last decay_fraction."""
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        decay_start = (1.0 - self.decay_fraction) * self.steps
        if step < decay_start or self.decay_fraction == 0:
            return self.lr * warm
        return self.lr * warm * max(0.0, (self.steps - step) / (self.decay_fraction * self.steps))


# ----- model construction and evaluation ------------------------------------------------------
def boot_model(cfg: TinyLMConfig, device: str = "cpu"):
    """A freshly initialised TL-native bridge for cfg (no download)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import native  # noqa: F401 (adds boot_native)

    return TransformerBridge.boot_native(cfg.bridge_config(), device=device)


def windows(stream: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """Non-overlapping windows (n, length) of a 1-D token stream, starting at `offset`."""
    n = (stream.numel() - offset) // length
    if n < 1:
        raise ValueError(
            f"the stream has {stream.numel()} tokens, fewer than one window of {length}."
        )
    return stream[offset : offset + n * length].view(n, length).long()


@torch.no_grad()
def loss_bits_per_byte(model, contexts: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-byte cross-entropy in bits over every predicted position of `contexts`."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, contexts.shape[0], batch_size):
        x = contexts[i : i + batch_size].to(device)
        per_tok = model(x, return_type="loss", loss_per_token=True)  # (n, T-1) nats
        total += float(per_tok.double().sum())
        count += per_tok.numel()
    return total / count / math.log(2)


@torch.no_grad()
def greedy_sample(model, prompt: str, n_bytes: int = 120, document_start: bool = True) -> str:
    """Greedy continuation of `prompt` by `n_bytes` bytes (decoded as UTF-8, errors replaced)."""
    device = next(model.parameters()).device
    ids = ([DOC_START] if document_start else []) + list(prompt.encode("utf-8"))
    n_ctx = model.cfg.n_ctx
    for _ in range(n_bytes):
        x = torch.tensor([ids[-n_ctx:]], device=device)
        ids.append(int(model(x)[0, -1].argmax()))
    start = len(prompt.encode("utf-8")) + (1 if document_start else 0)
    return bytes(ids[start:]).decode("utf-8", errors="replace")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----- training ------------------------------------------------------------------------------
def train_tiny_lm(
    cfg: TinyLMConfig,
    corpus: Corpus,
    directory: str | os.PathLike,
    *,
    resume: bool = True,
    num_threads: int | None = None,
    max_steps: int | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any] | None:
    """Train the model, checkpointing into `directory`; write weights + record; return it.
    `num_threads` sets torch's intra-op threads for the run (on a busy machine one thread is
    often much faster than several); None keeps the current setting. `max_steps` stops after
    that many steps of this call, leaving a checkpoint to resume from, and returns None."""
    if num_threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            return train_tiny_lm(
                cfg, corpus, directory, resume=resume, max_steps=max_steps, log=log
            )
        finally:
            torch.set_num_threads(previous)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ckpt_path = directory / CHECKPOINT_FILE
    model = boot_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, elapsed = 0, 0.0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = int(ck["step"]), float(ck["elapsed"])
        if log:
            log(f"tiny LM: resuming at step {step}/{cfg.steps}")
    train = corpus.tokens("train").long()
    T, B = cfg.n_ctx, cfg.batch_size
    if train.numel() <= T + 1:
        raise ValueError(f"the training split has {train.numel()} bytes, too few for n_ctx={T}.")
    offsets = torch.arange(T)
    t0 = time.perf_counter() - elapsed
    stop = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)

    def save_checkpoint() -> None:
        state = {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": time.perf_counter() - t0,
        }
        tmp = ckpt_path.with_name(f".{ckpt_path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)

    while step < stop:
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        starts = torch.randint(0, train.numel() - T, (B,), generator=g)
        x = train[starts[:, None] + offsets]  # (B, T)
        loss = model(x, return_type="loss")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"tiny LM loss became {loss.item()} at step {step}; lower lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        if log and (step % 100 == 0 or step == cfg.steps):
            bpb = loss.item() / math.log(2)
            log(
                f"tiny LM: step {step}/{cfg.steps}  train {bpb:.3f} bits/byte  "
                f"{time.perf_counter() - t0:.0f}s"
            )
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint()
    if step < cfg.steps:
        save_checkpoint()
        return None
    train_seconds = time.perf_counter() - t0
    model.eval()
    val_ctx = windows(corpus.tokens("val"), T)
    val_bpb = loss_bits_per_byte(model, val_ctx)
    save_tensors(model.state_dict(), directory / WEIGHTS_FILE)
    record = {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "bridge_config": cfg.bridge_config(),
        "corpus": corpus.describe(),
        "corpus_sha256": corpus.sha256,
        "val_loss_nats": val_bpb * math.log(2),
        "val_bits_per_byte": val_bpb,
        "val_bytes_predicted": int(val_ctx.shape[0] * (T - 1)),
        "train_seconds": train_seconds,
        "train_threads": torch.get_num_threads(),
        "n_params": sum(p.numel() for p in params),
        "weights_sha256": _file_sha256(directory / WEIGHTS_FILE),
        "torch_version": torch.__version__,
    }
    atomic_write_json(directory / RECORD_FILE, record)
    ckpt_path.unlink(missing_ok=True)
    if log:
        log(f"tiny LM: validation {val_bpb:.3f} bits/byte after {train_seconds:.0f}s")
    return record


@lru_cache(maxsize=4)
def default_corpus(val_fraction: float = 0.1) -> Corpus:
    """The full corpus (built once per process)."""
    return build_corpus(val_fraction=val_fraction)


@dataclass
class TinyLM:
    """The trained model with its corpus and training record."""

    model: Any
    cfg: TinyLMConfig
    corpus: Corpus
    record: dict[str, Any]
    directory: Path | None = None
    _tokens: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def tokens(self, split: Split) -> torch.Tensor:
        """The byte stream of a split (cached)."""
        if split not in self._tokens:
            self._tokens[split] = self.corpus.tokens(split)
        return self._tokens[split]

    @property
    def val_bits_per_byte(self) -> float:
        return float(self.record["val_bits_per_byte"])

    def sample(self, prompt: str, n_bytes: int = 120) -> str:
        """Greedy continuation of a prompt."""
        return greedy_sample(self.model, prompt, n_bytes)


def model_key(cfg: TinyLMConfig, corpus: Corpus) -> str:
    """Cache key of a model: its config, the corpus hash and the format version."""
    return short_hash(
        {
            "cfg": cfg.to_dict(),
            "corpus": corpus.sha256,
            "val": corpus.val_fraction,
            "v": FORMAT_VERSION,
        }
    )


def load_tiny_lm(
    cfg: TinyLMConfig | dict | None = None,
    *,
    retrain: bool = False,
    cache_dir: str | os.PathLike | None = None,
    corpus: Corpus | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
    log: Callable[[str], None] | None = print,
) -> TinyLM:
    """The cached model for cfg (trained first when absent, or when retrain=True)."""
    if isinstance(cfg, dict):
        cfg = TinyLMConfig.from_dict(cfg)
    cfg = cfg or TinyLMConfig()
    corpus = corpus or default_corpus(cfg.val_fraction)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    directory = root / "tiny_lm" / model_key(cfg, corpus)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # one process trains, the others wait and load (sweep points start side by side on a
    # fresh cache: each would otherwise train the same model into the same folder)
    with FileLock(directory.with_name(directory.name + ".lock")):
        have = (directory / WEIGHTS_FILE).is_file() and (directory / RECORD_FILE).is_file()
        if retrain and directory.exists():
            shutil.rmtree(directory)
        if retrain or not have:
            if log:
                log(
                    f"tiny LM: training {cfg.n_layers} layers x {cfg.d_model} wide for "
                    f"{cfg.steps} steps into {directory}"
                )
            record = train_tiny_lm(
                cfg, corpus, directory, resume=not retrain, num_threads=num_threads, log=log
            )
        else:
            record = json.loads((directory / RECORD_FILE).read_text())
    model = boot_model(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if torch.device(device) != torch.device("cpu"):
        model = model.to(device)
    return TinyLM(model, cfg, corpus, record, directory)


# ----- hooks ---------------------------------------------------------------------------------
def hook_layer(hook: str) -> int | None:
    """The block index in a hook name like 'blocks.3.hook_resid_pre', else None."""
    parts = hook.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def _is_block_input(hook: str) -> bool:
    return hook_layer(hook) is not None and hook.split(".", 2)[2] in ("hook_resid_pre", "hook_in")


def check_hook(model, hook: str) -> None:
    """Raise a clear error when `hook` is not a hook point of the model."""
    if hook not in model.hook_dict:
        resid = [h for h in model.hook_dict if "resid" in h]
        raise ConfigError(f"hook {hook!r} is not a hook point of this model; e.g. {resid[:6]}.")


@torch.no_grad()
def activations_at(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations (n, T, d) at `hook`, computing nothing past it (run_with_cache with
    names_filter and stop_at_layer). For a block's input (hook_resid_pre) the run stops at that
    block, whose input is returned; for hooks inside block L it stops after block L."""
    layer, n_layers = hook_layer(hook), model.cfg.n_layers
    if layer is not None and _is_block_input(hook):
        out, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=layer)
        return cache[hook] if hook in cache else out
    stop = layer + 1 if layer is not None and layer + 1 < n_layers else None
    _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=stop)
    return cache[hook]


# ----- the activation source -----------------------------------------------------------------
class TinyLMSource:
    """Residual-stream activations of the embedded model (the ``tiny`` activation source).

    ``batches(batch_size, start_batch)`` streams shuffled vectors of the ``split`` split from an
    ActivationStore (see store.py for the buffer, filters and disk cache); ``held_out(n)`` reads
    the other split. ``eval_contexts(n)`` gives the token windows held_out uses, for the
    evaluations that run the model (lm_eval.py).
    """

    def __init__(
        self,
        hook: str | None = None,
        context_len: int | None = None,
        split: Split = "train",
        seed: int = 0,
        *,
        model_cfg: TinyLMConfig | dict | None = None,
        retrain: bool = False,
        cache_dir: str | None = None,
        device: str = "cpu",
        harvest_contexts: int = 64,
        buffer_tokens: int = 65_536,
        exclude_first: bool = True,
        outlier_multiple: float | None = 10.0,
        cache: bool = False,
        cache_tokens: int = 1_000_000,
        lm: TinyLM | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ConfigError(f"split={split!r} is not known; choose 'train' or 'val'.")
        self.lm = lm or load_tiny_lm(model_cfg, cache_dir=cache_dir, retrain=retrain, device=device)
        self.model = self.lm.model
        self.hook = hook or f"blocks.{self.lm.cfg.n_layers - 1}.hook_resid_pre"
        check_hook(self.model, self.hook)
        self.context_len = int(context_len or self.lm.cfg.n_ctx)
        if not 2 <= self.context_len <= self.lm.cfg.n_ctx:
            raise ConfigError(
                f"context_len={self.context_len} must be in [2, n_ctx={self.lm.cfg.n_ctx}]."
            )
        self.split: Split = split
        self.seed = int(seed)
        self.harvest_contexts = int(harvest_contexts)
        self.device = device
        self.d_in = int(self.lm.cfg.d_model)
        store_cfg = StoreConfig(
            buffer_tokens=buffer_tokens,
            exclude_first=exclude_first,
            outlier_multiple=outlier_multiple,
            cache=cache,
            cache_tokens=cache_tokens,
            cache_dir=cache_dir,
        )
        self.store = ActivationStore(
            self.harvest,
            self._contexts,
            self.d_in,
            store_cfg,
            seed=self.seed,
            provenance=self._identity(),
        )

    def _identity(self) -> dict[str, Any]:
        return {
            "source": "tiny",
            "weights_sha256": self.lm.record.get("weights_sha256"),
            "corpus_sha256": self.lm.corpus.sha256,
            "hook": self.hook,
            "context_len": self.context_len,
            "split": self.split,
            "seed": self.seed,
        }

    def harvest(self, contexts: torch.Tensor) -> torch.Tensor:
        """Activations (n, T, d) at the hook for token windows (n, T), on the CPU in float32."""
        acts = activations_at(self.model, contexts.to(self.device), self.hook)
        return acts.float().cpu()

    def windows(self, split: Split, pass_idx: int = 0) -> torch.Tensor:
        """Non-overlapping windows of a split in a seeded order; pass p > 0 shifts the grid."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 * pass_idx + 17)
        stream = self.lm.tokens(split)
        offset = 0 if pass_idx == 0 else int(torch.randint(0, self.context_len, (1,), generator=g))
        w = windows(stream, self.context_len, offset)
        return w[torch.randperm(w.shape[0], generator=g)]

    def _contexts(self, pass_idx: int) -> Iterator[torch.Tensor]:
        w = self.windows(self.split, pass_idx)
        for i in range(0, w.shape[0], self.harvest_contexts):
            yield w[i : i + self.harvest_contexts]

    @property
    def held_out_split(self) -> Split:
        return "val" if self.split == "train" else "train"

    def eval_contexts(self, n_contexts: int) -> torch.Tensor:
        """The first n windows (n, T) of the held-out split in its fixed order."""
        w = self.windows(self.held_out_split, 0)
        if n_contexts > w.shape[0]:
            raise ValueError(
                f"the {self.held_out_split} split has {w.shape[0]} windows of "
                f"{self.context_len} bytes; ask for at most that many."
            )
        return w[:n_contexts]

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Endless (batch_size, d_in) float32 batches, deterministic from the seed."""
        return self.store.batches(batch_size, start_batch)

    def held_out(self, n_tokens: int) -> torch.Tensor:
        """(n_tokens, d_in) float32 from the held-out split, filtered like the training stream."""
        probe = ActivationStore(self.harvest, self._contexts, self.d_in, self.store.cfg)
        w = self.windows(self.held_out_split, 0)
        out, n = [], 0
        for i in range(0, w.shape[0], self.harvest_contexts):
            v = probe.filter(self.harvest(w[i : i + self.harvest_contexts]))
            out.append(v)
            n += v.shape[0]
            if n >= n_tokens:
                return torch.cat(out)[:n_tokens]
        raise ValueError(
            f"the {self.held_out_split} split yields only {n} vectors after filtering; ask for "
            f"at most that many."
        )

    def describe(self) -> dict[str, Any]:
        """Provenance: model, corpus, hook, store settings and filter counts."""
        rec = self.lm.record
        return {
            **self._identity(),
            "d_in": self.d_in,
            "val_bits_per_byte": float(rec["val_bits_per_byte"]),
            "model": {
                "config": rec["config"],
                "n_params": rec.get("n_params"),
                "train_seconds": rec.get("train_seconds"),
                "val_bits_per_byte": float(rec["val_bits_per_byte"]),
            },
            "corpus": self.lm.corpus.describe(),
            **self.store.describe(),
        }


__all__ = [
    "TinyLMConfig",
    "TinyLM",
    "TinyLMSource",
    "activations_at",
    "boot_model",
    "greedy_sample",
    "hook_layer",
    "load_tiny_lm",
    "loss_bits_per_byte",
    "train_tiny_lm",
    "windows",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train (or load) the embedded byte-level model.")
    p.add_argument("--retrain", action="store_true", help="train anew even if cached")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--samples", type=int, default=120, help="bytes per greedy sample")
    p.add_argument("--threads", type=int, default=None, help="torch threads while training")
    a = p.parse_args(argv)
    cfg = TinyLMConfig() if a.steps is None else TinyLMConfig(steps=a.steps)
    lm = load_tiny_lm(cfg, retrain=a.retrain, num_threads=a.threads)
    rec = lm.record
    print(
        json.dumps(
            {
                k: rec[k]
                for k in ("val_bits_per_byte", "train_seconds", "n_params", "corpus_sha256")
            },
            indent=2,
        )
    )
    for prompt in ("Return the ", "class ", "The module "):
        print(repr(prompt), "->", repr(lm.sample(prompt, a.samples)))


if __name__ == "__main__":
    main()
