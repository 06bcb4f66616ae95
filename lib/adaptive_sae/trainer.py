"""Training loop (DESIGN §6): Adam with warm-up and decay, unit-norm decoder, running feature
statistics, inference thresholds, auxiliary losses, atomic checkpoints and exact resume.

    run = train(cfg, tcfg, data, checkpoint_dir="ckpt")         # interrupted ...
    run = train(cfg, tcfg, data, resume_from="ckpt")             # ... continues, same weights

``data`` is an (N, d) tensor (shuffled per epoch from the seed), an activation source with
``batches(batch_size, start_batch=0)``, or an iterable of (B, d) batches. On resume, batches
already consumed are skipped, so the stream must be deterministic (sources are).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file
from torch import Tensor

from . import losses
from .config import (
    SAEConfig,
    TrainConfig,
    check_compatible,
    resolve_k_aux,
    resolve_lr,
)
from .sae import SparseAutoencoder, atomic_save_tensors, atomic_write_bytes
from .stats import FeatureStats


class NonFiniteError(FloatingPointError):
    """Training met non-finite activations, loss or gradients."""


@dataclass
class TrainRun:
    """The result of train(): the SAE, a per-step history table and the feature statistics."""

    sae: SparseAutoencoder
    history: pd.DataFrame
    stats: FeatureStats
    cfg: SAEConfig
    tcfg: TrainConfig
    checkpoint_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ----- data ----------------------------------------------------------------------------------
def _tensor_batches(x: Tensor, B: int, seed: int, start: int) -> Iterator[Tensor]:
    per_epoch = x.shape[0] // B
    step = start
    while True:
        epoch, j = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(x.shape[0], generator=g)
        while j < per_epoch:
            yield x[perm[j * B : (j + 1) * B]]
            j += 1
            step += 1


def batch_stream(data: Any, batch_size: int, d_in: int, seed: int, start: int = 0) -> Iterator:
    """An iterator of (batch_size, d_in) batches starting at batch index ``start``."""
    if isinstance(data, Tensor):
        if data.ndim != 2 or data.shape[1] != d_in:
            raise ValueError(
                f"data tensor must have shape (N, d_in={d_in}), got {tuple(data.shape)}."
            )
        if data.shape[0] < batch_size:
            raise ValueError(
                f"data holds {data.shape[0]} tokens, fewer than one batch of {batch_size}; "
                f"lower batch_size or pass more tokens."
            )
        return _tensor_batches(data, batch_size, seed, start)
    if hasattr(data, "batches"):
        try:
            return iter(data.batches(batch_size, start_batch=start))
        except TypeError:
            return itertools.islice(iter(data.batches(batch_size)), start, None)
    if isinstance(data, Iterable):
        return itertools.islice(iter(data), start, None)
    raise TypeError(
        f"cannot train on {type(data).__name__}: pass an (N, d) tensor, an activation source "
        f"(adaptive_sae.data.activation_source) or an iterable of (B, d) batches."
    )


def _checked(batch: Any, step: int, B: int, d: int) -> Tensor:
    if not isinstance(batch, Tensor) or batch.shape != (B, d):
        shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(
            f"batch of step {step} has shape {shape}, expected ({B}, {d}); make the data "
            f"yield batches of TrainConfig.batch_size tokens."
        )
    return batch


# ----- schedule ------------------------------------------------------------------------------
def lr_at(step: int, n_steps: int, base: float, warmup: float, decay: float) -> float:
    """Linear warm-up over the first warmup fraction, linear decay over the last decay fraction."""
    w, dcy = int(warmup * n_steps), int(decay * n_steps)
    if w > 0 and step < w:
        return base * (step + 1) / w
    if dcy > 0 and step >= n_steps - dcy:
        return base * (n_steps - step) / dcy
    return base


# ----- checkpoints ---------------------------------------------------------------------------
def _latest_checkpoint(root: Path) -> Path:
    root = Path(root)
    if (root / "trainer_state.json").exists():
        return root
    pointer = root / "latest"
    if not pointer.exists():
        raise FileNotFoundError(
            f"no checkpoint in {root}: expected a 'latest' file written by train(..., "
            f"checkpoint_dir={str(root)!r})."
        )
    return root / pointer.read_text().strip()


class _Trainer:
    def __init__(self, cfg: SAEConfig, tcfg: TrainConfig, checkpoint_dir: Path | None):
        check_compatible(cfg, tcfg)
        self.cfg, self.tcfg = cfg, tcfg
        self.device = torch.device(tcfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={tcfg.device!r} but CUDA is not available; use 'cpu'.")
        g = torch.Generator().manual_seed(tcfg.seed)
        self.sae = SparseAutoencoder(cfg, generator=g).to(self.device)
        self.sae.train_batch_size.fill_(tcfg.batch_size)
        self.base_lr = resolve_lr(tcfg, cfg.n_features)
        self.k_aux = resolve_k_aux(tcfg, cfg.d_in)
        # fused: one pass over each parameter, no temporaries (CPU and CUDA)
        self.opt = torch.optim.Adam(
            self.sae.parameters(), lr=self.base_lr, betas=tcfg.adam_betas, fused=True
        )
        self.stats = FeatureStats(
            cfg.n_features,
            tcfg.dead_window_tokens,
            tcfg.density_window_tokens,
            tcfg.gamma,
            tcfg.zipf_head_fraction,
            self.device,
        )
        self.l1_coef = tcfg.l1_coefficient
        self.step = 0
        self.rows: list[dict[str, float]] = []
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._fast = None
        # relu_l1 matches every positive entry: there is nothing sparse to exploit.
        if tcfg.fast_path and cfg.sparsifier != "relu_l1":
            from . import kernels

            self._fast = kernels
            self._ws = kernels.Workspace()  # the B×F affinities reused across steps

    # -- state --
    def save_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        root = self.checkpoint_dir
        root.mkdir(parents=True, exist_ok=True)
        name = f"step_{self.step:08d}"
        tmp = root / f".tmp_{name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.sae.save(tmp)
        atomic_save_tensors(self.stats.state_dict(), tmp / "stats.safetensors")
        torch.save(self.opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "train_cfg.json").write_text(self.tcfg.to_json())
        pd.DataFrame(self.rows).to_csv(tmp / "history.csv", index=False)
        state = {"step": self.step, "l1_coef": self.l1_coef, "rows": self.rows}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_bytes(root / "latest", name.encode())
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[: -self.tcfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, where: Path) -> None:
        ckpt = _latest_checkpoint(where)
        saved = TrainConfig.from_json((ckpt / "train_cfg.json").read_text())
        if saved != self.tcfg:
            raise ValueError(
                f"checkpoint {ckpt} was written with a different TrainConfig; resume with the "
                f"same configuration (differences: "
                f"{ {k: v for k, v in saved.to_dict().items() if self.tcfg.to_dict()[k] != v} })."
            )
        loaded = SparseAutoencoder.load(ckpt, device=str(self.device))
        if loaded.cfg != self.cfg:
            raise ValueError(f"checkpoint {ckpt} holds an SAE with a different SAEConfig.")
        self.sae.load_state_dict(loaded.state_dict())
        self.stats.load_state_dict(load_file(str(ckpt / "stats.safetensors")))
        self.opt.load_state_dict(
            torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True)
        )
        state = json.loads((ckpt / "trainer_state.json").read_text())
        self.step, self.l1_coef, self.rows = state["step"], state["l1_coef"], state["rows"]

    # -- one step --
    def _forward(self, x_s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Returns (x_hat_s, P detached, selected flat indices, P with grad or None)."""
        sae = self.sae
        if self._fast is not None:
            k = self._fast
            P = k.affinities(x_s, sae.W_enc, sae.b_enc, sae.b_dec, self._ws)  # no grad
            idx = k.select(sae, P, self._ws)
            x_hat = k.sparse_reconstruct(x_s, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, idx, P)[0]
            return x_hat, P, idx, None
        P = sae.pre_acts(x_s)
        idx = sae.select(P.detach())
        codes = torch.zeros_like(P).reshape(-1)
        codes = codes.index_put((idx,), P.reshape(-1)[idx].relu()).reshape(P.shape)
        return codes @ sae.W_dec + sae.b_dec, P.detach(), idx, P

    def _aux(self, e: Tensor, P: Tensor, P_grad: Tensor | None, x_s: Tensor) -> Tensor:
        tcfg, sae, stats = self.tcfg, self.sae, self.stats
        if tcfg.aux_loss == "none":
            return x_s.new_zeros(())
        if tcfg.aux_loss == "aux_k":
            mask, alloc, deficits = stats.dead_mask, "topk", None
        else:
            mask, alloc, deficits = stats.underutilised_mask, tcfg.aux_allocation, stats.deficits
        if not bool(mask.any()):
            return x_s.new_zeros(())
        if self._fast is not None:
            return self._fast.sparse_aux_loss(
                e,
                x_s,
                P,
                sae.W_enc,
                sae.b_enc,
                sae.W_dec,
                sae.b_dec,
                mask,
                alloc,
                self.k_aux,
                deficits,
            )
        return losses.aux_reconstruction_loss(
            e, P_grad, sae.W_dec, mask, alloc, k_aux=self.k_aux, deficits=deficits
        )

    def _fail(self, step: int, what: str) -> None:
        where = self.save_checkpoint()
        saved = (
            f"the last good state (before step {step}) is saved in {where}"
            if where
            else "no checkpoint_dir was given, so nothing was saved"
        )
        raise NonFiniteError(
            f"step {step}: {what}; training stopped and {saved}. Check the activations for "
            f"inf/NaN, or lower the learning rate."
        )

    def train_step(self, x: Tensor) -> dict[str, float] | None:
        cfg, tcfg, sae, stats = self.cfg, self.tcfg, self.sae, self.stats
        step, B = self.step, tcfg.batch_size
        if not bool(torch.isfinite(x).all()):
            self._fail(step, "the batch holds non-finite activations")
        lr = lr_at(step, tcfg.n_steps, self.base_lr, tcfg.warmup_fraction, tcfg.decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x_s = sae.scale_input(x)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=tcfg.autocast_bf16):
            x_hat, P, idx, P_grad = self._forward(x_s)
            x_hat = x_hat.float()
            recon = losses.normalized_mse(x_s, x_hat)
            loss = recon
            aux = self._aux(x_s - x_hat, P, P_grad, x_s)
            loss = loss + tcfg.aux_coef * aux
            l1 = None
            if cfg.sparsifier == "relu_l1":
                codes = (P_grad if P_grad is not None else sae.pre_acts(x_s)).relu()
                l1 = losses.l1_penalty(codes, sae.W_dec)
                loss = loss + self.l1_coef * l1
        if not bool(torch.isfinite(loss)):
            self._fail(step, f"the loss is {loss.item()}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        params = list(sae.parameters())
        if tcfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        if not bool(torch.isfinite(gnorm)):
            self._fail(step, "the gradient is non-finite")
        self.opt.step()
        sae.normalize_decoder()

        # statistics: matches are selected entries with P > 0
        with torch.no_grad():
            F = cfg.n_features
            matched = idx[P.reshape(-1)[idx] > 0]
            counts = torch.bincount(matched % F, minlength=F)
            stats.update(counts, B)
            sae.update_thresholds(P, idx)
            if cfg.sparsifier == "feature_choice_zipf" and cfg.capacity_ranking == "demand":
                top = P.topk(max(1, math.ceil(cfg.k)), dim=1).indices.reshape(-1)
                stats.update_demand(torch.bincount(top, minlength=F), B)
                if (step + 1) % tcfg.demand_rerank_every == 0:
                    sae.capacity_order.copy_(torch.argsort(-stats.demand, stable=True))
            if (step + 1) % tcfg.zipf_refit_every == 0 or step == 0:
                stats.refit()
            else:  # between refits, features that just died join the underutilised set
                stats.underutilised_mask |= stats.dead_mask
            if cfg.sparsifier == "relu_l1" and tcfg.l1_adapt_rate > 0:
                # multiplicative controller in log space, clipped so it cannot overshoot
                err = math.log(max(matched.numel() / B, 0.05) / cfg.k)
                self.l1_coef *= math.exp(tcfg.l1_adapt_rate * max(-1.0, min(1.0, err)))
        self.step += 1
        if self.step % tcfg.log_every and self.step != tcfg.n_steps:
            return None
        l0_tok = torch.bincount(matched // F, minlength=B).float()
        row = {
            "step": self.step,
            "tokens": self.step * B,
            "lr": lr,
            "loss": loss.item(),
            "nmse": recon.item(),
            "aux_loss": float(aux.detach()),
            "l1_coef": self.l1_coef if cfg.sparsifier == "relu_l1" else float("nan"),
            "l0_mean": l0_tok.mean().item(),
            "l0_std": l0_tok.std().item(),
            **stats.summary(),
        }
        self.rows.append(row)
        return row


def train(
    cfg: SAEConfig,
    tcfg: TrainConfig,
    data: Any,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool = False,
    callback: Callable[[int, dict[str, float] | None], None] | None = None,
) -> TrainRun:
    """Train one SAE. Checkpoints go to ``checkpoint_dir`` every ``tcfg.checkpoint_every``
    steps and at the end; ``resume_from`` continues an interrupted run (and keeps writing
    checkpoints there unless another ``checkpoint_dir`` is given). ``callback(step, row)`` is
    called after every step (row is None on steps that are not logged)."""
    if checkpoint_dir is None and resume_from is not None:
        checkpoint_dir = resume_from
    t = _Trainer(cfg, tcfg, Path(checkpoint_dir) if checkpoint_dir is not None else None)
    d, B = cfg.d_in, tcfg.batch_size
    if resume_from is not None:
        t.load_checkpoint(Path(resume_from))
        stream = batch_stream(data, B, d, tcfg.seed, start=t.step)
    else:
        stream = batch_stream(data, B, d, tcfg.seed)
        n_init = max(1, math.ceil(tcfg.init_sample_tokens / B))
        head = [_checked(b, i, B, d) for i, b in zip(range(n_init), stream)]
        sample = torch.cat(head).to(t.device, torch.float32)
        if not bool(torch.isfinite(sample).all()):
            raise NonFiniteError(
                "the first batches hold non-finite activations; clean the data (e.g. drop "
                "inf/NaN rows) before training."
            )
        t.sae.init_from_data(sample)
        stream = itertools.chain(head, stream)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.n_steps, initial=t.step, desc=cfg.sparsifier, leave=False)
    every = tcfg.checkpoint_every
    while t.step < tcfg.n_steps:
        step = t.step
        try:
            batch = next(stream)
        except StopIteration:
            raise ValueError(
                f"the data ran out after {step} batches but total_tokens asks for "
                f"{tcfg.n_steps}; pass more data or lower total_tokens."
            ) from None
        x = _checked(batch, step, B, d).to(t.device, torch.float32)
        row = t.train_step(x)
        if every and t.step % every == 0 and t.step < tcfg.n_steps:
            t.save_checkpoint()
        if bar is not None:
            bar.update(1)
            if row:
                bar.set_postfix(nmse=f"{row['nmse']:.3f}", dead=f"{row['dead_frac']:.2f}")
        if callback is not None:
            callback(step, row)
    if bar is not None:
        bar.close()
    t.save_checkpoint()
    t.sae.eval()
    return TrainRun(
        sae=t.sae,
        history=pd.DataFrame(t.rows),
        stats=t.stats,
        cfg=cfg,
        tcfg=tcfg,
        checkpoint_dir=t.checkpoint_dir,
        info={"lr": t.base_lr, "k_aux": t.k_aux, "fast_path": t._fast is not None},
    )


__all__ = ["train", "TrainRun", "NonFiniteError", "batch_stream", "lr_at"]
