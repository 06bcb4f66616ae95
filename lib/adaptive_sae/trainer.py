"""Training loop (DESIGN §6): Adam with warm-up and decay, unit-norm decoder, running feature
statistics, inference thresholds, auxiliary losses, atomic checkpoints and exact resume.

    run = train(cfg, tcfg, data, checkpoint_dir="ckpt")         # interrupted ...
    run = train(cfg, tcfg, data, resume_from="ckpt")             # ... continues, same weights

``data`` is an (N, d) tensor (shuffled per epoch from the seed), an activation source with
``batches(batch_size, start_batch=0)``, or an iterable of (B, d) batches. On resume, batches
already consumed are skipped, so the stream must be deterministic (sources are).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.optim.adam import adam as _functional_adam

from . import checkpoints, loss_kernel, losses, selection_kernels, update_kernel
from .config import (
    ConfigError,
    SAEConfig,
    TrainConfig,
    check_compatible,
    resolve_k_aux,
    resolve_lr,
)
from .distributed import current_comm, global_variance
from .resample import resample_dead
from .rules import get_rule
from .sae import SparseAutoencoder
from .sparse_ops import Workspace, affinities, sparse_reconstruct, values_at
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
            # index_select: advanced indexing (x[rows]) was 6x slower here on a CPU
            yield x.index_select(0, perm[j * B : (j + 1) * B])
            j += 1
            step += 1


def batch_stream(data: Any, batch_size: int, d_in: int, seed: int, start: int = 0) -> Iterator:
    """An iterator of (batch_size, d_in) batches starting at batch index ``start``."""
    if isinstance(data, np.ndarray) or (
        isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple))
    ):  # array-likes of activations become one float32 tensor
        data = torch.as_tensor(np.asarray(data, dtype=np.float32))
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


DENSE_MASK_SHARE = 8
"""A dense-code rule's mask (``select_mask``) stands for its matches while more than one entry
in DENSE_MASK_SHARE is selected; below, its flat indices do (cheaper to count and gather), and
the step takes the loss kernel on them (``Trainer._few_codes_grads``), not dense products."""


def _checked(batch: Any, step: int, B: int, d: int) -> Tensor:
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, Tensor) or batch.shape != (B, d):
        shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(
            f"batch of step {step} has shape {shape}, expected ({B}, {d}); make the data "
            f"yield batches of TrainConfig.batch_size tokens."
        )
    return batch


def _holds_nonfinite(x: Tensor, comm) -> bool:
    """Whether any rank's batch holds inf or NaN. One process: the sum first (a tenth of the
    cost of a mask at B×d = 1024×64; a non-finite entry makes it non-finite), then the exact
    check only where the sum is not finite (it may overflow on finite entries)."""
    if comm.world == 1:
        return not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all())
    bad = (~torch.isfinite(x)).any().double().reshape(1)
    return bool(comm.sum_(bad) > 0)


def _in_layout_of(param: Tensor, grad: Tensor) -> Tensor:
    """``grad`` with ``param``'s strides (the fused Adam updates parameter and gradient
    element by element in memory order; an SAE's W_enc is column-major)."""
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


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
    return checkpoints.latest_checkpoint(root)


@torch.no_grad()
def adam_steps(trainers: Sequence[Trainer]) -> None:
    """Every SAE's Adam step (its own optimiser's state and settings), one fused call per
    distinct (lr, betas, eps, weight decay): what each ``Adam(fused=True).step()`` computes,
    without ``Optimizer.step``'s bookkeeping (a third of a small SAE's update). A lone trainer
    calls it with itself, a grid with all its SAEs."""
    groups: dict[tuple, list[list[Tensor]]] = {}
    for t in trainers:
        for group in t.opt.param_groups:
            beta1, beta2 = group["betas"]
            key = (
                float(group["lr"]),
                float(beta1),
                float(beta2),
                float(group["eps"]),
                float(group["weight_decay"]),
                bool(group.get("decoupled_weight_decay", False)),
                bool(group.get("amsgrad", False)),
                bool(group.get("maximize", False)),
            )
            lists = groups.setdefault(key, [[], [], [], [], [], []])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = t.opt.state[p]
                if len(state) == 0:  # as Adam's lazy initialisation (fused: step on device)
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if key[6]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                for lst, v in zip(
                    lists,
                    (
                        p,
                        p.grad,
                        state["exp_avg"],
                        state["exp_avg_sq"],
                        state.get("max_exp_avg_sq"),
                        state["step"],
                    ),
                ):
                    if v is not None:
                        lst.append(v)
    for key, (params, grads, m, v, vmax, steps) in groups.items():
        lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize = key
        _functional_adam(
            params,
            grads,
            m,
            v,
            vmax,
            steps,
            fused=True,
            decoupled_weight_decay=decoupled,
            amsgrad=amsgrad,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=wd,
            eps=eps,
            maximize=maximize,
        )


class Trainer:
    """One SAE and everything its training needs: optimiser, feature statistics, schedule,
    checkpoints. ``step(x)`` trains on one (B, d) batch of raw activations; ``fit(data)``
    runs the whole budget (what :func:`train` calls).

        t = Trainer(cfg, tcfg)
        t.init_from_data(sample)           # input scale and b_dec from a sample
        for x in batches: row = t.step(x)  # a history row on logged steps, else None
    """

    def __init__(
        self,
        cfg: SAEConfig,
        tcfg: TrainConfig,
        checkpoint_dir: str | os.PathLike | None = None,
    ):
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
        self.rule = get_rule(cfg.rule)
        self.rule_state = self.rule.init_train_state(tcfg)
        if tcfg.resample_every_tokens:  # how many features were resampled so far
            self.rule_state["resampled"] = 0.0
        self.steps_done = 0
        self.rows: list[dict[str, float]] = []
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._ws = Workspace()  # the B×F affinities reused across steps
        self._kernel_counts: Tensor | None = None  # this step's matches, counted by the kernel
        self._grads_out: dict[str, Tensor] | None = None  # the closed-form gradients' buffers
        self._update_plan: update_kernel.UpdatePlan | None = None
        # Non-finite checks: every step on a CPU (a check costs nothing there); on an
        # accelerator flags accumulate on the device and are read every check_every steps,
        # the state at the start of the window kept to replay it (see verify())
        self.check_every = 1 if self.device.type == "cpu" else 16
        self._window: dict[str, Any] | None = None
        # data parallel when launched in a process group (torchrun); one process otherwise
        self.comm = current_comm()
        if tcfg.batch_size % self.comm.world:
            raise ConfigError(
                f"batch_size={tcfg.batch_size} is the global batch and must split evenly over "
                f"{self.comm.world} processes; use a multiple of {self.comm.world}."
            )
        self.local_batch_size = tcfg.batch_size // self.comm.world

    # -- state --
    def save_checkpoint(self) -> Path | None:
        self.verify()  # only a state whose steps were all checked is saved
        if self.checkpoint_dir is None or self.comm.rank != 0:  # rank 0 writes for all
            return None
        state = {"rule_state": self.rule_state, "rows": self.rows}
        return checkpoints.save_checkpoint(
            self.checkpoint_dir,
            self.steps_done,
            self.sae,
            self.stats.state_dict(),
            self.opt,
            self.tcfg,
            state,
            history=pd.DataFrame(self.rows),
        )

    def load_checkpoint(self, where: Path) -> None:
        state = checkpoints.load_checkpoint(
            where, self.sae, self.stats, self.opt, self.cfg, self.tcfg, self.device
        )
        self.steps_done, self.rule_state, self.rows = (
            state["step"],
            state["rule_state"],
            state["rows"],
        )

    # -- one step --
    @torch.no_grad()
    def init_from_data(self, sample: Tensor) -> None:
        """Input scale and b_dec from a sample (N, d) of raw activations (before step 0)."""
        sample = sample.to(self.device, torch.float32)
        if self.comm.world > 1:  # every rank initialises from the same (whole) sample
            sample = self.comm.gather_fixed(sample).reshape(-1, sample.shape[-1])
        if not bool(torch.isfinite(sample).all()):
            raise NonFiniteError(
                "the first batches hold non-finite activations; clean the data (e.g. drop "
                "inf/NaN rows) before training."
            )
        if float((sample - sample.mean(0)).pow(2).sum()) == 0.0:
            raise ValueError(
                "the first batches are constant (every activation the same): NMSE, relative to "
                "the activations' variance, is undefined; check the data (hook, layer, source)."
            )
        self.sae.init_from_data(sample)

    def _forward(self, x_s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Returns (x_hat_s, P without grad, selected flat indices, dense codes or None).

        Sparse rules: the dense product once, then O(K·d) (``sparse_ops``). Dense rules
        (ReLU+L1, nearly every entry active): dense codes with autograd."""
        sae = self.sae
        if self.rule.sparse:
            P = affinities(x_s, sae.W_enc, sae.b_enc, sae.b_dec, self._ws)
            idx = self.rule.select_global(sae, P, self._ws, self.comm)
            x_hat = sparse_reconstruct(x_s, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, idx, P)
            return x_hat.x_hat, P, idx, None
        P_grad = sae.pre_acts(x_s)
        P = P_grad.detach()
        mask, idx = self._dense_matches(P)
        codes = P_grad.relu() * mask.to(P.dtype)  # a float mask: a bool one costs 10x here
        return codes @ sae.W_dec + sae.b_dec, P, idx, codes

    def _dense_matches(self, P: Tensor) -> tuple[Tensor, Tensor]:
        """A dense-code rule's selection: (mask (B, F), what the statistics read: the mask
        while most entries match, else their flat indices)."""
        mask = self.rule.select_mask(self.sae, P)
        if mask is None:
            idx = self.rule.select_global(self.sae, P, self._ws, self.comm)
            mask = torch.zeros(P.numel(), dtype=torch.bool, device=P.device)
            mask[idx] = True
            return mask.view(P.shape), idx
        if int(mask.count_nonzero()) * DENSE_MASK_SHARE > mask.numel():
            return mask, mask  # most entries match (early in training)
        return mask, mask.reshape(-1).nonzero().squeeze(1)  # few: indices cost less

    def _closed_form_applies(self) -> bool:
        """Whether the step takes its main loss's gradient in closed form, not from autograd
        (one process, full precision, kernels on): a sparse rule's from ``loss_kernel`` (on a
        CPU, a small step), a dense-code rule's from three dense products (``_dense_grads``;
        any device, where the rule gives its penalty's gradient). Both sum in another order
        than autograd, so ``ADAPTIVE_SAE_KERNELS=0`` turns them off with the kernels."""
        if self.comm.world != 1 or self.tcfg.autocast_bf16 or not selection_kernels.use_kernels:
            return False
        if not self.rule.sparse:
            return self.rule.has_closed_form()
        work = self.cfg.budget(self.local_batch_size) * self.cfg.d_in  # K·d
        return self.device.type == "cpu" and loss_kernel.applies(self.sae.W_enc, work)

    def _forward_closed_form(self, x_s: Tensor, sae=None, ws=None, out=None):
        """The forward with the main loss's gradient in closed form: (x̂, P, matches, loss,
        NMSE, aux loss, gradients by parameter name, written into ``out`` where given). The
        auxiliary loss keeps its autograd path (on ``sae``'s parameters: in a grid, leaves
        standing for this SAE's slice of the stacked ones)."""
        own, ws = self.sae, ws or self._ws
        P = affinities(x_s, own.W_enc, own.b_enc, own.b_dec, ws)
        penalty = None
        if self.rule.sparse:
            idx = self.rule.select_global(own, P, ws, self.comm)
            x_hat, recon, grads = self._loss_by_kernel(x_s, P, idx, out)
        else:
            mask, idx = self._dense_matches(P)
            few = idx is not mask and idx.numel() * DENSE_MASK_SHARE <= P.numel()
            if few and loss_kernel.applies(own.W_enc, idx.numel() * self.cfg.d_in):
                x_hat, recon, grads, penalty = self._few_codes_grads(x_s, P, idx, out)
            else:
                x_hat, recon, grads, penalty = self._dense_grads(x_s, P, mask)
        aux, loss = x_s.new_zeros(()), recon
        if self.tcfg.aux_loss != "none":
            e = x_s - x_hat
            aux, selection = self._aux_by_kernel(e, P, x_s, grads)
            if aux is None:  # autograd, on the selection already made
                aux = self._aux(e, P, x_s, sae, selection)
            loss = recon + self.tcfg.aux_coef * aux
        if penalty is not None:
            loss = loss + penalty
        return x_hat, P, idx, loss, recon, aux, grads

    def _loss_by_kernel(self, x_s: Tensor, P: Tensor, idx: Tensor, out=None, code_weights=None):
        """``loss_kernel.nmse_and_grads`` on the entries ``idx`` of P: (x̂, NMSE, gradients,
        written into ``out`` or this SAE's own buffers); the matches it counts (by feature,
        then by token) are kept for :meth:`_observe`."""
        own = self.sae
        counts = torch.zeros(P.shape[1] + P.shape[0], dtype=torch.int64)
        x_hat, recon, grads = loss_kernel.nmse_and_grads(
            x_s, P, idx, own.W_enc, own.W_dec, own.b_dec, out=out or self._grad_buffers(),
            counts=counts, code_weights=code_weights,
        )  # fmt: skip
        self._kernel_counts = counts
        return x_hat, recon, grads

    def _grad_buffers(self) -> dict[str, Tensor]:
        """Where a lone SAE's closed-form gradients are written, each in its parameter's
        layout: the same tensors every step, so that the update kernel's plan holds."""
        sae, bufs = self.sae, self._grads_out
        if bufs is None or any(
            bufs[n].shape != getattr(sae, n).shape or bufs[n].dtype != getattr(sae, n).dtype
            for n in update_kernel.NAMES
        ):
            bufs = {n: torch.empty_like(getattr(sae, n)).detach() for n in update_kernel.NAMES}
            self._grads_out = bufs
        return bufs

    @torch.no_grad()
    def _few_codes_grads(self, x_s: Tensor, P: Tensor, idx: Tensor, out=None):
        """A dense-code rule's step once few codes are active (flat indices ``idx`` of P > 0):
        the loss kernel on them as on a sparse rule's selection, with the rule's penalty
        (linear in the codes) through its per-feature sums. Returns as :meth:`_dense_grads`."""
        B, F = P.shape
        sums = torch.zeros(F, dtype=P.dtype).index_add_(0, idx % F, values_at(P, idx))
        pen = self.rule.penalty_and_grads(self.sae, sums, B, self.rule_state)
        weights = None if pen is None else pen[1]
        x_hat, recon, grads = self._loss_by_kernel(x_s, P, idx, out, weights)
        if pen is None:
            return x_hat, recon, grads, None
        grads["W_dec"].add_(pen[2])
        return x_hat, recon, grads, pen[0]

    @torch.no_grad()
    def _dense_grads(self, x_s: Tensor, P: Tensor, mask: Tensor):
        """Dense codes Z = ReLU(P) ⊙ M, x̂ = Z W_dec + b_dec, and the gradients of the NMSE
        and the rule's penalty: ∂Z = ∂x̂ W_decᵀ (+ the penalty's), ∂P = ∂Z ⊙ M ⊙ [P > 0],
        ∂W_dec = Zᵀ ∂x̂ (+ the penalty's), ∂W_enc = (x_s − b_dec)ᵀ ∂P, ∂b_enc = Σ_b ∂P,
        ∂b_dec = Σ_b ∂x̂ − W_enc ∂b_enc. Three dense products, as autograd's backward, without
        its passes over B×F. Returns (x̂, NMSE, gradients, penalty or None)."""
        sae = self.sae
        W_enc, W_dec, b_dec = sae.W_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach()
        codes = P.relu().mul_(mask.to(P.dtype))  # float masks: a bool one costs 10x here
        x_hat = torch.addmm(b_dec, codes, W_dec)
        recon, gx = losses.normalized_mse_and_grad(x_s, x_hat)
        pen = self.rule.penalty_and_grads(sae, codes.sum(0), codes.shape[0], self.rule_state)
        dW_dec = codes.t() @ gx
        if pen is None:
            g_codes = gx @ W_dec.t()
        else:
            g_codes = torch.addmm(pen[1].expand_as(codes), gx, W_dec.t())
            dW_dec += pen[2]
        gP = g_codes.mul_(codes.sign())  # 1 where matched and P > 0 (codes ≥ 0), else 0
        db_enc = gP.sum(0)
        grads = {
            "W_enc": _in_layout_of(W_enc, (x_s - b_dec).t() @ gP),
            "b_enc": db_enc,
            "W_dec": _in_layout_of(W_dec, dW_dec),
            "b_dec": gx.sum(0) - W_enc @ db_enc,
        }
        return x_hat, recon, grads, None if pen is None else pen[0]

    def _aux_features(self) -> tuple[Tensor, str, Tensor | None]:
        """The auxiliary loss's (feature mask, allocation, deficits) from the statistics."""
        tcfg, stats = self.tcfg, self.stats
        if tcfg.aux_loss == "aux_k":
            return stats.dead_mask, "topk", None
        return stats.underutilised_mask, tcfg.aux_allocation, stats.deficits

    def _aux(self, e: Tensor, P: Tensor, x_s: Tensor, sae=None, selection=None) -> Tensor:
        if self.tcfg.aux_loss == "none":
            return x_s.new_zeros(())
        mask, alloc, deficits = self._aux_features()
        return losses.aux_loss(
            e, x_s, P, sae or self.sae, mask, alloc, self.k_aux, deficits, comm=self.comm,
            selection=selection,
        )  # fmt: skip

    def _aux_by_kernel(self, e: Tensor, P: Tensor, x_s: Tensor, grads: dict[str, Tensor]):
        """The auxiliary loss in closed form by the loss kernel (the residual e reconstructed
        without b_dec from the auxiliary selection), aux_coef × its gradients added to
        ``grads``: (its value or None, the selection). None where the selection is dense (the
        column-subset product) or too large for the kernel: autograd then takes it."""
        mask, alloc, deficits = self._aux_features()
        if not bool(mask.any()):
            return x_s.new_zeros(()), None
        selection = losses.aux_selection(P, mask, alloc, self.k_aux, deficits)
        flat = losses.aux_sparse_entries(P, selection[0], selection[2])
        sae = self.sae
        if flat is None or not loss_kernel.applies(sae.W_enc, flat.numel() * self.cfg.d_in):
            return None, selection
        _, value, g = loss_kernel.nmse_and_grads(
            x_s, P, flat, sae.W_enc, sae.W_dec, sae.b_dec, target=e, decoder_bias=False
        )
        for name, grad in grads.items():
            grad.add_(g[name], alpha=self.tcfg.aux_coef)
        return value, selection

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

    def step(self, x: Tensor) -> dict[str, float] | None:
        """One optimiser step on a batch x (B, d) of raw activations (under data parallelism,
        this rank's (B/W, d) share of the global batch). Returns the history row on logged
        steps (every ``log_every`` and the last), else None."""
        deferred = self.check_every > 1 and self.comm.world == 1
        if deferred:
            self._open_window(x)
        x_s, lr = self._begin(x)
        grads = None
        if self._closed_form_applies():
            x_hat, P, idx, loss, recon, aux, grads = self._forward_closed_form(x_s)
        else:
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.tcfg.autocast_bf16):
                x_hat, P, idx, codes = self._forward(x_s)
                x_hat = x_hat.float()
                loss, recon, aux = self._losses(x_s, x_hat, P, codes)
        if deferred:
            self._flag(1, ~torch.isfinite(loss))
        elif self.comm.world == 1 and not bool(torch.isfinite(loss)):
            self._fail(self.steps_done, f"the loss is {loss.item()}")
        if grads is not None:  # the main loss's gradient, in closed form
            for name, g in grads.items():
                p = getattr(self.sae, name)
                if p.grad is not g:
                    p.grad = g
        else:
            self.opt.zero_grad(set_to_none=True)
        if loss.requires_grad:  # (in closed form: the auxiliary loss's, added to it)
            loss.backward()
        if self.comm.world > 1:
            self._all_reduce_grads()
        self._update()
        row = self._after(x_s, x_hat, P, idx, loss, recon, aux, lr)
        if deferred and (
            self.steps_done % self.check_every == 0 or self.steps_done == self.tcfg.n_steps
        ):
            self.verify()
        return row

    # -- non-finite checks read every check_every steps --
    def snapshot(self) -> dict[str, Any]:
        """A copy of the training state (weights, optimiser, statistics, rule state, history
        length, step) that :meth:`restore` returns to."""
        clone = lambda d: {k: v.detach().clone() for k, v in d.items()}  # noqa: E731
        return {
            "step": self.steps_done,
            "sae": clone(self.sae.state_dict()),
            "opt": copy.deepcopy(self.opt.state_dict()),
            "stats": clone(self.stats.state_dict()),
            "rule_state": dict(self.rule_state),
            "rows": len(self.rows),
        }

    def restore(self, snap: dict[str, Any]) -> None:
        """Back to the state of a :meth:`snapshot` (the parameters are written in place)."""
        self.sae.load_state_dict(snap["sae"])
        self.opt.load_state_dict(snap["opt"])
        self.stats.load_state_dict(snap["stats"])
        self.rule_state, self.rows = dict(snap["rule_state"]), self.rows[: snap["rows"]]
        self.steps_done = snap["step"]

    def _open_window(self, x: Tensor) -> None:
        """Keep the batch; at the start of a window, the state to replay it from."""
        if self._window is None:
            self._window = {
                **self.snapshot(),
                "batches": [],
                "flags": torch.zeros(self.check_every, 3, dtype=torch.bool, device=self.device),
            }
        self._window["batches"].append(x)

    def _flag(self, what: int, bad: Tensor) -> None:
        """Record (without reading it back) a non-finite batch (0), loss (1) or gradient (2)."""
        w = self._window
        if w is not None and len(w["batches"]) <= w["flags"].shape[0]:
            w["flags"][len(w["batches"]) - 1, what] = bad

    def verify(self) -> None:
        """Read the non-finite flags of the steps since the last check (one transfer). If one
        is set, go back to the state before the window and replay it with a check every step:
        the failing step stops with its own message and the last good state is saved, exactly
        as with ``check_every=1``."""
        w, self._window = self._window, None
        if w is None or not bool(w["flags"].any()):
            return
        self.restore(w)
        every, self.check_every = self.check_every, 1
        try:
            for x in w["batches"]:
                self.step(x)
        finally:
            self.check_every = every
        self._fail(self.steps_done, "a non-finite value was flagged but did not recur on replay")

    # -- the phases of a step (``adaptive_sae.grid`` runs them for many SAEs at once) --
    def _begin(self, x: Tensor, checked: bool = False) -> tuple[Tensor, float]:
        """Check the batch, set this step's learning rate; the scaled input x_s and the lr."""
        cfg, tcfg, comm, step = self.cfg, self.tcfg, self.comm, self.steps_done
        self._kernel_counts = None  # none from a step that did not finish
        if not checked:
            x = _checked(x, step, self.local_batch_size, cfg.d_in).to(self.device, torch.float32)
            if self._window is not None and self.check_every > 1:
                self._flag(0, (~torch.isfinite(x)).any())
            elif _holds_nonfinite(x, comm):
                self._fail(step, "the batch holds non-finite activations")
        lr = lr_at(step, tcfg.n_steps, self.base_lr, tcfg.warmup_fraction, tcfg.decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return self.sae.scale_input(x), lr

    def _losses(self, x_s: Tensor, x_hat: Tensor, P: Tensor, codes, sae=None):
        """(loss, reconstruction NMSE, auxiliary loss) of one step; ``sae`` holds the
        parameters the loss differentiates (views of stacked ones in a grid)."""
        tcfg, comm = self.tcfg, self.comm
        x_hat = x_hat.float()
        if comm.world == 1:
            recon = losses.normalized_mse(x_s, x_hat)
        else:  # this rank's share of the global NMSE: summed over ranks it is the NMSE
            recon = (x_s - x_hat).pow(2).sum() / global_variance(x_s, comm).clamp_min(1e-12)
        e = x_s - x_hat
        aux = self._aux(e, P, x_s) if sae is None else self._aux(e, P, x_s, sae)
        loss = recon + tcfg.aux_coef * aux
        penalty = None
        if codes is not None:
            penalty = self.rule.penalty(sae or self.sae, codes, self.rule_state)
        if penalty is not None:
            loss = loss + penalty / comm.world  # a mean over the global batch
        return loss, recon, aux

    def _update(self) -> None:
        """Project the decoder's gradient, clip the gradient (stop on a non-finite one), take
        the optimiser step and renormalise the decoder: by ``update_kernel`` where it applies."""
        sae = self.sae
        plan = self._kernel_plan()
        if plan is not None:
            gnorm = update_kernel.project_and_norm(plan)
            self._check_grad_norm(gnorm)
            update_kernel.clip_adam_and_renormalize(plan, gnorm, self.tcfg.grad_clip)
            return
        sae.remove_parallel_grad()
        self._check_grad_norm(self._clip_grads())
        adam_steps([self])
        sae.normalize_decoder()

    def _clip_grads(self) -> Tensor:
        """Clip the gradient norm to ``grad_clip`` (0: no clipping); the norm before it."""
        params = list(self.sae.parameters())
        if self.tcfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))

    def _kernel_plan(self) -> update_kernel.UpdatePlan | None:
        """``update_kernel``'s plan for this step's update (one process; see its
        ``plan_for``), the last step's where it still holds, kept for the next; None for the
        torch path."""
        if self.comm.world != 1:
            return None
        self._update_plan = update_kernel.plan_for(self.sae, self.opt, self._update_plan)
        return self._update_plan

    def _check_grad_norm(self, gnorm: Tensor | float) -> None:
        if isinstance(gnorm, float):  # the update kernel's, already on the host
            if math.isfinite(gnorm):
                return
            gnorm = torch.tensor(gnorm)
        if self._window is not None and self.check_every > 1:
            self._flag(2, ~torch.isfinite(gnorm))
        elif not bool(torch.isfinite(gnorm)):
            self._fail(self.steps_done, "the gradient is non-finite")

    def _after(self, x_s, x_hat, P, idx, loss, recon, aux, lr) -> dict[str, float] | None:
        """Statistics and the rule's state from this step's selection, then :meth:`_finish`."""
        matched = self._observe(P, idx)
        return self._finish(x_s, x_hat, matched, loss, recon, aux, lr)

    @torch.no_grad()
    def _observe(self, P: Tensor, idx: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Feature statistics and the rule's observation of this step's affinities and
        selection (neither reads the parameters); returns the matches (selected, P > 0): flat
        indices, a (B, F) mask where the rule selected by one (``select_mask``), or their
        counts (by feature (F,), by token (B,)) where the loss kernel counted them."""
        cfg, tcfg, stats, comm = self.cfg, self.tcfg, self.stats, self.comm
        step, B, F = self.steps_done, tcfg.batch_size, cfg.n_features
        counted, self._kernel_counts = self._kernel_counts, None
        if counted is not None:  # the loss kernel counted them: (by feature, by token)
            matched = (counted[:F], counted[F:])
            counts = matched[0]
        elif idx.dtype == torch.bool:
            matched = idx & (P > 0)
            counts = matched.sum(0)
        else:
            matched = idx[values_at(P, idx) > 0]
            counts = torch.bincount(matched % F, minlength=F)
        stats.update(comm.sum_(counts) if comm.world > 1 else counts, B)
        if comm.world > 1:  # a rule written for one process need not take comm
            self.rule.observe(self.sae, P, idx, stats, step, tcfg, comm=comm)
        else:
            self.rule.observe(self.sae, P, idx, stats, step, tcfg)
        if (step + 1) % tcfg.zipf_refit_every == 0 or step == 0:
            stats.refit()
        else:  # between refits, features that just died join the underutilised set
            stats.underutilised_mask |= stats.dead_mask
        return matched

    @torch.no_grad()
    def _finish(self, x_s, x_hat, matched, loss, recon, aux, lr) -> dict[str, float] | None:
        """The rule's state after the step, resampling, the step count and the history row."""
        cfg, tcfg, stats, comm = self.cfg, self.tcfg, self.stats, self.comm
        step, B, B_l, F = self.steps_done, tcfg.batch_size, self.local_batch_size, cfg.n_features
        counted = isinstance(matched, tuple)
        is_mask = not counted and matched.dtype == torch.bool
        if counted:
            n_matched = int(matched[0].sum())
        else:
            n_matched = int(matched.count_nonzero()) if is_mask else matched.numel()
        if comm.world > 1:
            n_matched = int(comm.sum_(torch.tensor([n_matched], device=matched.device)).item())
        self.rule.after_step(self.rule_state, n_matched, B, cfg, tcfg)
        every = tcfg.resample_every_tokens
        if every and ((step + 1) * B) // every > (step * B) // every:
            n = resample_dead(self, x_s, x_hat)
            self.rule_state["resampled"] = self.rule_state.get("resampled", 0.0) + n
        self.steps_done += 1
        if self.steps_done % tcfg.log_every and self.steps_done != tcfg.n_steps:
            return None
        if counted:
            l0_tok = matched[1].double()
        elif is_mask:
            l0_tok = matched.sum(1).double()
        else:
            l0_tok = torch.bincount(matched // F, minlength=B_l).double()
        sums = torch.stack(
            [
                loss.detach().double(),
                recon.detach().double(),
                aux.detach().double(),
                l0_tok.sum(),
                l0_tok.pow(2).sum(),
            ]
        ).tolist()
        if comm.world > 1:  # loss and NMSE are shares of the global ones; aux likewise
            sums = comm.sum_(torch.tensor(sums, dtype=torch.float64, device=self.device)).tolist()
        l0_mean = sums[3] / B
        l0_var = max(0.0, (sums[4] - B * l0_mean**2) / max(1, B - 1))
        row = {
            "step": self.steps_done,
            "tokens": self.steps_done * B,
            "lr": lr,
            "loss": sums[0],
            "nmse": sums[1],
            "aux_loss": sums[2] / (1 if comm.world == 1 else comm.world),
            **self.rule_state,
            "l0_mean": l0_mean,
            "l0_std": math.sqrt(l0_var),
            **stats.summary(),
        }
        self.rows.append(row)
        return row

    def _all_reduce_grads(self) -> None:
        """Sum the gradients over ranks in one flat buffer."""
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.comm.sum_(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _shard(self, batch: Tensor) -> Tensor:
        """This rank's share of a global batch (all of it in one process)."""
        if self.comm.world == 1:
            return batch
        r, b = self.comm.rank, self.local_batch_size
        return batch[r * b : (r + 1) * b]

    def fit(
        self,
        data: Any,
        *,
        resume: bool = False,
        progress: bool = False,
        callback: Callable[[int, dict[str, float] | None], None] | None = None,
    ) -> TrainRun:
        """Train until ``tcfg.total_tokens``: initialise from the first batches (or, with
        ``resume``, skip the batches the loaded checkpoint consumed), step, checkpoint.
        Subnormal floats are flushed to zero meanwhile (``update_kernel.denormals_flushed``)."""
        with update_kernel.denormals_flushed(self.device):
            return self._fit(data, resume, progress, callback)

    def _fit(self, data: Any, resume: bool, progress: bool, callback) -> TrainRun:
        cfg, tcfg = self.cfg, self.tcfg
        d, B = cfg.d_in, tcfg.batch_size
        stream = batch_stream(data, B, d, tcfg.seed, start=self.steps_done)
        if not resume:
            n_init = max(1, math.ceil(tcfg.init_sample_tokens / B))
            head = [_checked(b, i, B, d) for i, b in zip(range(n_init), stream)]
            self.init_from_data(torch.cat([self._shard(b) for b in head]))
            stream = itertools.chain(head, stream)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tcfg.n_steps, initial=self.steps_done, desc=cfg.rule, leave=False)
        every = tcfg.checkpoint_every
        while self.steps_done < tcfg.n_steps:
            step = self.steps_done
            try:
                batch = next(stream)
            except StopIteration:
                self.save_checkpoint()
                raise ValueError(
                    f"the data ran out after {step} batches but total_tokens asks for "
                    f"{tcfg.n_steps}; pass more data or lower total_tokens."
                ) from None
            row = self.step(self._shard(_checked(batch, step, B, d)))
            if every and self.steps_done % every == 0 and self.steps_done < tcfg.n_steps:
                self.save_checkpoint()
            if bar is not None:
                bar.update(1)
                if row:
                    bar.set_postfix(nmse=f"{row['nmse']:.3f}", dead=f"{row['dead_pct']:.1f}%")
            if callback is not None:
                callback(step, row)
        if bar is not None:
            bar.close()
        self.save_checkpoint()
        self.sae.eval()
        return TrainRun(
            sae=self.sae,
            history=pd.DataFrame(self.rows),
            stats=self.stats,
            cfg=cfg,
            tcfg=tcfg,
            checkpoint_dir=self.checkpoint_dir,
            info={"lr": self.base_lr, "k_aux": self.k_aux},
        )


def train(
    cfg: SAEConfig,
    tcfg: TrainConfig,
    data: Any,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool = False,
    callback: Callable[[int, dict[str, float] | None], None] | None = None,
    overwrite: bool = False,
) -> TrainRun:
    """Train one SAE. Checkpoints go to ``checkpoint_dir`` every ``tcfg.checkpoint_every``
    steps and at the end; ``resume_from`` continues an interrupted run (and keeps writing
    checkpoints there unless another ``checkpoint_dir`` is given). A ``checkpoint_dir`` holding
    another run's checkpoints is refused unless ``overwrite=True`` (which deletes them).
    ``callback(step, row)`` is called after every step (row is None on steps that are not logged)."""
    if checkpoint_dir is None and resume_from is not None:
        checkpoint_dir = resume_from
    if checkpoint_dir is not None:  # a bad or occupied folder fails now, not after training
        checkpoints.prepare(checkpoint_dir, resume_from=resume_from, overwrite=overwrite)
    t = Trainer(cfg, tcfg, Path(checkpoint_dir) if checkpoint_dir is not None else None)
    if resume_from is not None:
        t.load_checkpoint(Path(resume_from))
    return t.fit(data, resume=resume_from is not None, progress=progress, callback=callback)


__all__ = ["train", "Trainer", "TrainRun", "NonFiniteError", "batch_stream", "lr_at"]
