"""Many SAEs in one pass over the data (DESIGN §9-§10): a set of SAEs sharing d_in, the data
stream and the batch size, differing in rule, k, width, learning rate, auxiliary loss, seed...

    from adaptive_sae.grid import train_many
    runs = train_many([(cfg_a, tcfg_a), (cfg_b, tcfg_b), ...], data, checkpoint_dir="ckpt")

Each SAE trains exactly as ``train(cfg, tcfg, data)`` would train it alone (same batches: on an
(N, d) tensor each seed's own shuffle, else the one stream; same initialisation, schedule,
selection, losses, statistics and optimiser) and the result is equal to float tolerance (the
tests check every rule and both auxiliary losses, and resume). What is shared:

- the data: one pass; batches of members with the same seed are drawn once;
- the parameters of the SAEs of one width live in stacked (n, ...) tensors (each SAE's
  parameters are views of them), and the sparse reconstruction of all of them, forward and
  backward, is one call on the stacked tensors (``sparse_ops.stacked_reconstruct``), so the
  fixed cost of a step is paid once per width, not once per SAE;
- one backward pass for all losses; checks of non-finite values once per step for the set.

Where every SAE takes its closed-form step (on a CPU at the suite's sizes: the compiled loss
and update kernels, nothing computed for several SAEs at once), the grid instead trains each
SAE through a block of up to ``BLOCK_STEPS`` steps on the block's batches (drawn once) before
the next, so its weights and Adam state stay in cache; a non-finite value replays the block in
lockstep, so a stop saves every SAE at the failing step as above.

Per SAE remain what depends on its rule and state: the dense product P (one B×F buffer per SAE,
computed where it stays in cache), the selection, the auxiliary loss, gradient clipping, Adam
(its own optimiser, so its state and checkpoints are those of a lone run) and the statistics.

Checkpoints of the whole set: ``checkpoint_dir/sae_000``, ``sae_001``... each a lone run's
checkpoint folder (so any one SAE can be resumed or loaded alone), and ``grid.json`` naming the
members; resume continues from the newest step every member has.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import checkpoints, io, update_kernel
from .config import ConfigError, SAEConfig, TrainConfig
from .sparse_ops import Workspace, affinities, stacked_reconstruct, values_at
from .trainer import (
    NonFiniteError,
    Trainer,
    TrainRun,
    _checked,
    _holds_nonfinite,
    adam_steps,
    batch_stream,
)

MANIFEST = "grid.json"

BLOCK_STEPS = 16
"""Where every SAE takes the closed-form step (``GridTrainer.by_member``), the grid trains
each SAE through up to this many steps before the next (``GridTrainer.block_steps``): the
batches of a block are drawn once and held (16 × B × d floats per seed), and blocks end where a
checkpoint is due. Results do not depend on it."""


def _member_dir(root: Path, i: int) -> Path:
    return root / f"sae_{i:03d}"


class _Width:
    """The SAEs of one width: their parameters stacked, each SAE's parameters views of them."""

    def __init__(self, members: list[tuple[int, Trainer]], column_major: bool = False):
        """``column_major``: each SAE's slice of the stacked W_enc in a lone SAE's layout (what
        the loss kernel writes its gradient into); else the stack is contiguous."""
        self.slots = members
        saes = [t.sae for _, t in members]
        self.params: dict[str, Tensor] = {}
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            own = [getattr(s, name) for s in saes]
            if name == "W_enc" and column_major:
                stacked = torch.stack([p.detach().t() for p in own]).transpose(1, 2)
            else:
                stacked = torch.stack([p.detach() for p in own])
            for i, p in enumerate(own):
                p.data = stacked[i]  # the SAE's parameter now aliases its slice
            self.params[name] = stacked.requires_grad_(True)

        self.aux_leaves: list[tuple[int, SimpleNamespace]] = []
        self.kernel_grads: dict[str, Tensor] | None = None  # the loss kernel's, this step

    def hand_out_grads(self) -> None:
        """Each SAE's parameter gradients become views of the stacked gradients (the loss
        kernel's where it ran; auxiliary losses' gradients, on leaves of their own, added in)."""
        if self.kernel_grads is not None:
            for name, p in self.params.items():
                p.grad = self.kernel_grads[name]
            self.kernel_grads = None
        for j, leaves in self.aux_leaves:
            for name, p in self.params.items():
                g = getattr(leaves, name).grad
                if g is not None:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad[j] += g
        self.aux_leaves = []
        for j, (_, t) in enumerate(self.slots):
            for name, p in self.params.items():
                g = p.grad
                getattr(t.sae, name).grad = None if g is None else g[j]

    @torch.no_grad()
    def project_and_clip(self) -> Tensor:
        """Each SAE's decoder-gradient projection and gradient clipping (as a lone run's
        ``remove_parallel_grad`` and ``clip_grad_norm_``) on the stacked tensors; returns the
        gradient norms (n,) before clipping."""
        W, g = self.params["W_dec"], self.params["W_dec"].grad
        if g is not None:
            g -= (g * W).sum(-1, keepdim=True) * W
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(gr.flatten(1), dim=1) for gr in grads])
        total = torch.linalg.vector_norm(norms, dim=0)  # (n,)
        clip = torch.tensor([float(t.tcfg.grad_clip) for _, t in self.slots], device=W.device)
        coef = torch.where(clip > 0, (clip / (total + 1e-6)).clamp(max=1.0), 1.0)
        for gr in grads:
            gr.mul_(coef.view(-1, *([1] * (gr.ndim - 1))).to(gr.dtype))
        return total

    @torch.no_grad()
    def normalize_decoders(self) -> None:
        W = self.params["W_dec"]
        W /= W.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


class GridTrainer:
    """Train a set of SAEs (``members``: (SAEConfig, TrainConfig) pairs) in one pass.

    The members must share ``d_in``, ``batch_size``, ``total_tokens``, ``device`` and
    ``autocast_bf16``; everything else may differ. ``step(xs)`` trains every SAE on one batch
    (``xs``: one (B, d) tensor for all, or one per member); ``fit(data)`` runs the budget."""

    def __init__(
        self,
        members: Sequence[tuple[SAEConfig, TrainConfig]],
        checkpoint_dir: str | os.PathLike | None = None,
    ):
        members = list(members)
        if not members:
            raise ConfigError("a grid needs at least one (SAEConfig, TrainConfig) member.")
        cfg0, tcfg0 = members[0]
        for i, (cfg, tcfg) in enumerate(members):
            for what, a, b in (
                ("SAEConfig.d_in", cfg.d_in, cfg0.d_in),
                ("TrainConfig.batch_size", tcfg.batch_size, tcfg0.batch_size),
                ("TrainConfig.total_tokens", tcfg.total_tokens, tcfg0.total_tokens),
                ("TrainConfig.device", tcfg.device, tcfg0.device),
                ("TrainConfig.autocast_bf16", tcfg.autocast_bf16, tcfg0.autocast_bf16),
                ("TrainConfig.checkpoint_every", tcfg.checkpoint_every, tcfg0.checkpoint_every),
            ):
                if a != b:
                    raise ConfigError(
                        f"grid member {i} has {what}={a!r} but member 0 has {b!r}; SAEs trained "
                        f"in one pass share it (train the others in another grid)."
                    )
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.trainers = [
            Trainer(
                cfg,
                tcfg,
                None if self.checkpoint_dir is None else _member_dir(self.checkpoint_dir, i),
            )
            for i, (cfg, tcfg) in enumerate(members)
        ]
        if self.trainers[0].comm.world > 1:
            raise ConfigError(
                "a grid trains in one process; under torch.distributed train each SAE with "
                "adaptive_sae.train (data parallel) instead."
            )
        self.batch_size, self.d_in = tcfg0.batch_size, cfg0.d_in
        self.n_steps = tcfg0.n_steps
        by_width: dict[int, list[tuple[int, Trainer]]] = {}
        self.dense: list[tuple[int, Trainer]] = []  # dense-code rules train as alone
        for i, t in enumerate(self.trainers):
            if t.rule.sparse:
                by_width.setdefault(t.cfg.n_features, []).append((i, t))
            else:
                self.dense.append((i, t))
        # decided once: the stacked layout and the fit loop follow it
        self.by_member = self._by_member()
        self.widths = [_Width(m, column_major=self.by_member) for m in by_width.values()]
        self._ws = Workspace()  # one B×F buffer for the SAEs without an auxiliary loss
        self.block_steps = BLOCK_STEPS

    @property
    def steps_done(self) -> int:
        return self.trainers[0].steps_done

    # -- one step for every SAE --
    def step(self, xs: Tensor | Sequence[Tensor]) -> list[dict[str, float] | None]:
        """One optimiser step of every SAE; ``xs`` one batch for all or one per member.
        Returns each member's history row (None on steps it does not log)."""
        n = len(self.trainers)
        if isinstance(xs, Tensor):
            xs = [xs] * n
        if len(xs) != n:
            raise ValueError(f"step got {len(xs)} batches for {n} SAEs; pass one or one each.")
        step, B, d = self.steps_done, self.batch_size, self.d_in
        dev = self.trainers[0].device
        ready: dict[int, Tensor] = {}  # each distinct batch checked once
        for x in xs:
            if id(x) not in ready:
                ready[id(x)] = _checked(x, step, B, d).to(dev, torch.float32)
                if _holds_nonfinite(ready[id(x)], self.trainers[0].comm):
                    self._fail(step, "the batch holds non-finite activations")
        xs = [ready[id(x)] for x in xs]
        state: list[Any] = [None] * n
        total = None
        autocast = self.trainers[0].tcfg.autocast_bf16
        with torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
            for w in self.widths:
                for i, out in self._forward_width(w, xs):
                    state[i] = out
            dense_grads = {}  # the closed-form gradients of dense-code members, by member
            for i, t in self.dense:  # dense codes (ReLU+L1): as a lone run
                x_s, lr = t._begin(xs[i], checked=True)
                if t._closed_form_applies():
                    x_hat, P, idx, loss, recon, aux, dense_grads[i] = t._forward_closed_form(x_s)
                else:
                    x_hat, P, idx, codes = t._forward(x_s)
                    x_hat = x_hat.float()
                    loss, recon, aux = t._losses(x_s, x_hat, P, codes)
                state[i] = (x_s, x_hat, t._observe(P, idx), loss, recon, aux, lr)
        for s in state:
            total = s[3] if total is None else total + s[3]
        losses_ = torch.stack([s[3].detach().float() for s in state])
        if not bool(torch.isfinite(losses_).all()):
            bad = int((~torch.isfinite(losses_)).nonzero()[0, 0])
            self._fail(step, f"SAE {bad}'s loss is {losses_[bad].item()}")
        for w in self.widths:
            w.zero_grad()
        for i, t in self.dense:
            t.opt.zero_grad(set_to_none=True)
            for name, g in dense_grads.get(i, {}).items():
                getattr(t.sae, name).grad = g
        if total.requires_grad:  # not when every gradient came in closed form
            total.backward()
        for w in self.widths:
            w.hand_out_grads()
        plans = [t._kernel_plan() for t in self.trainers]
        if all(p is not None for p in plans):
            self._update_by_kernel(step, plans)
        else:
            self._update(step)
        rows = [t._finish(*s) for t, s in zip(self.trainers, state)]
        return rows

    def _by_member(self) -> bool:
        """Whether every SAE takes the closed-form step (a CPU's path at the suite's sizes):
        then nothing of a step is computed for several SAEs at once, and each SAE runs the
        steps of a block on its own, its weights and Adam state staying in cache (stepping
        them all in lockstep was 15 % slower at 18 SAEs of d=64, F=512)."""
        return all(t._closed_form_applies() for t in self.trainers)

    def _run(self, block: list[list[Tensor]]) -> list[list[dict[str, float] | None]]:
        """The steps of ``block`` (per step, one batch per member); their history rows. By
        member where ``by_member``, else in lockstep. A non-finite value met by member
        returns every SAE to the block's start and replays it in lockstep, which stops at the
        failing step with every SAE's state of before it saved, as without blocks."""
        if len(block) == 1 or not self.by_member:
            return [self.step(xs) for xs in block]
        snaps = [t.snapshot() for t in self.trainers]
        dirs = [t.checkpoint_dir for t in self.trainers]
        rows: list[list[dict[str, float] | None]] = [[None] * len(self.trainers) for _ in block]
        try:
            for t in self.trainers:  # a member's own stop must not save it alone
                t.checkpoint_dir = None
            for i, t in enumerate(self.trainers):
                for s, xs in enumerate(block):
                    rows[s][i] = t.step(xs[i])
            return rows
        except NonFiniteError:
            pass
        finally:
            for t, d in zip(self.trainers, dirs):
                t.checkpoint_dir = d
        for t, snap in zip(self.trainers, snaps):
            t.restore(snap)
        rows = [self.step(xs) for xs in block]
        self._fail(self.steps_done, "a non-finite value was met by one SAE but not on replay")
        return rows

    def _update_by_kernel(self, step: int, plans: list[update_kernel.UpdatePlan]) -> None:
        """Each SAE's update by ``update_kernel`` on its views of the stacked tensors (as its
        lone run's step), every gradient norm checked before any SAE changes."""
        norms = [update_kernel.project_and_norm(p) for p in plans]
        bad = [i for i, n in enumerate(norms) if not math.isfinite(n)]
        if bad:
            self._fail(step, f"SAE {bad[0]}'s gradient is non-finite")
        for t, plan, gnorm in zip(self.trainers, plans, norms):
            update_kernel.clip_adam_and_renormalize(plan, gnorm, t.tcfg.grad_clip)

    def _update(self, step: int) -> None:
        """Each SAE's projection and clipping on the stacked tensors, one fused Adam call for
        all, the stacked decoders renormalised."""
        norms = []
        for w in self.widths:  # one pass over the stacked gradients of each width
            norms.append(w.project_and_clip())
        for _, t in self.dense:
            t.sae.remove_parallel_grad()
            norms.append(t._clip_grads().reshape(1))
        order = [i for w in self.widths for i, _ in w.slots] + [i for i, _ in self.dense]
        norms_ = torch.cat(norms)
        if not bool(torch.isfinite(norms_).all()):
            bad = order[int((~torch.isfinite(norms_)).nonzero()[0, 0])]
            self._fail(step, f"SAE {bad}'s gradient is non-finite")
        adam_steps(self.trainers)
        for w in self.widths:
            w.normalize_decoders()
        for _, t in self.dense:
            t.sae.normalize_decoder()

    def _forward_width(self, w: _Width, xs: list[Tensor]):
        """Yield (member, (x_s, x̂, matches, loss, NMSE, aux, lr)) for the SAEs of one width.

        Each SAE's P is consumed while it is in cache: selected, its values gathered and its
        statistics observed (they read no parameter, so before the update as after it), in one
        B×F buffer shared by the SAEs without an auxiliary loss; those with one keep their P
        until their auxiliary loss (it selects on P with the statistics of before this step)."""
        prm = w.params
        det = {k: v.detach() for k, v in prm.items()}
        w.aux_leaves = []
        if all(t._closed_form_applies() for _, t in w.slots):
            yield from self._forward_width_by_kernel(w, xs, det)
            return
        per = []
        for j, (i, t) in enumerate(w.slots):
            x_s, lr, has_aux, ws = self._begin_member(t, xs[i])
            P = affinities(x_s, det["W_enc"][j], det["b_enc"][j], det["b_dec"][j], ws)
            idx = t.rule.select(t.sae, P, ws)
            pre = values_at(P, idx)
            matched = None if has_aux else t._observe(P, idx)
            per.append((i, t, x_s, lr, P if has_aux else None, idx, pre, matched))
        x_s_all = torch.stack([p[2] for p in per])
        x_hat_all = stacked_reconstruct(
            x_s_all,
            prm["W_enc"],
            prm["b_enc"],
            prm["W_dec"],
            prm["b_dec"],
            list(range(len(per))),
            [p[5] for p in per],
            [p[6] for p in per],
        )
        # unbind: one gradient (n, B, d) for all, not a zero-filled one per SAE as slices give
        x_hats = x_hat_all.unbind(0)
        for j, (i, t, x_s, lr, P, idx, _, matched) in enumerate(per):
            x_hat = x_hats[j].float()
            if P is None:
                loss, recon, aux = t._losses(x_s, x_hat, None, None)
            else:  # the auxiliary loss on leaves of its own, added to the stacked gradient
                leaves = SimpleNamespace(**{n: v[j].requires_grad_(True) for n, v in det.items()})
                w.aux_leaves.append((j, leaves))
                loss, recon, aux = t._losses(x_s, x_hat, P, None, leaves)
                matched = t._observe(P, idx)
            yield i, (x_s, x_hat, matched, loss, recon, aux, lr)

    def _begin_member(self, t: Trainer, x: Tensor):
        """A member's scaled batch and learning rate, whether it has an auxiliary loss, and the
        buffers its P goes to: the grid's shared one (with the member's own selection hints)
        unless its auxiliary loss needs P after the next member's."""
        x_s, lr = t._begin(x, checked=True)
        has_aux = t.tcfg.aux_loss != "none"
        ws = t._ws
        if not has_aux:
            ws, ws.hints = self._ws, t._ws.hints
        return x_s, lr, has_aux, ws

    def _forward_width_by_kernel(self, w: _Width, xs: list[Tensor], det: dict[str, Tensor]):
        """As ``_forward_width``, each SAE's reconstruction loss and its gradient in closed form
        (by the loss kernel, as its lone run's step), written into the stacked gradients."""
        w.kernel_grads = {k: torch.empty_like(v) for k, v in det.items()}
        for j, (i, t) in enumerate(w.slots):
            x_s, lr, has_aux, ws = self._begin_member(t, xs[i])
            leaves = None
            if has_aux:  # the auxiliary loss on leaves of its own, added to the stacked gradient
                leaves = SimpleNamespace(**{n: v[j].requires_grad_(True) for n, v in det.items()})
                w.aux_leaves.append((j, leaves))
            out = {k: v[j] for k, v in w.kernel_grads.items()}
            x_hat, P, idx, loss, recon, aux, _ = t._forward_closed_form(x_s, leaves, ws, out)
            yield i, (x_s, x_hat, t._observe(P, idx), loss, recon, aux, lr)

    # -- checkpoints --
    def _manifest(self) -> dict[str, Any]:
        return {
            "members": [
                {"sae": json.loads(t.cfg.to_json()), "train": json.loads(t.tcfg.to_json())}
                for t in self.trainers
            ]
        }

    def save_checkpoint(self) -> Path | None:
        """Every member's checkpoint of this step, then the manifest."""
        if self.checkpoint_dir is None:
            return None
        for t in self.trainers:
            t.save_checkpoint()
        io.atomic_write_text(self.checkpoint_dir / MANIFEST, json.dumps(self._manifest()))
        return self.checkpoint_dir

    def load_checkpoint(self, root: str | os.PathLike) -> None:
        """Resume every member from the newest step all of them hold."""
        root = Path(root)
        man = root / MANIFEST
        if not man.exists():
            raise checkpoints.CheckpointError(
                f"{man} is missing: {root} holds no grid checkpoint (GridTrainer.save_checkpoint "
                f"writes it); resume a single SAE with adaptive_sae.train(resume_from=...)."
            )
        saved = json.loads(man.read_text())["members"]
        if len(saved) != len(self.trainers):
            raise ConfigError(
                f"{root} holds a grid of {len(saved)} SAEs but this grid has "
                f"{len(self.trainers)}; resume with the same members, in the same order."
            )
        common = None
        for i in range(len(self.trainers)):
            steps = {s for s, f in checkpoints.step_folders(_member_dir(root, i))}
            common = steps if common is None else common & steps
        if not common:
            raise checkpoints.CheckpointError(
                f"no step of {root} is saved for every SAE of the grid; start it afresh."
            )
        step = max(common)
        for i, t in enumerate(self.trainers):
            t.load_checkpoint(_member_dir(root, i) / checkpoints.step_name(step))

    def _fail(self, step: int, what: str) -> None:
        where = self.save_checkpoint()
        saved = (
            f"the last good state (before step {step}) of every SAE is saved in {where}"
            if where
            else "no checkpoint_dir was given, so nothing was saved"
        )
        raise NonFiniteError(
            f"step {step}: {what}; training stopped and {saved}. Check the activations for "
            f"inf/NaN, or lower the learning rate."
        )

    # -- the whole budget --
    def fit(
        self,
        data: Any,
        *,
        resume: bool = False,
        progress: bool = False,
        callback: Callable[[int, list[dict[str, float] | None]], None] | None = None,
    ) -> list[TrainRun]:
        """Train every SAE until ``total_tokens`` on ``data`` (as :func:`adaptive_sae.train`
        reads it), one pass; returns one TrainRun per member, in order. ``callback(step,
        rows)`` follows each step (where SAEs train by member, each step of a block after the
        block, before its checkpoint). Subnormal floats are flushed to zero meanwhile, as in
        :meth:`Trainer.fit`."""
        with update_kernel.denormals_flushed(self.trainers[0].device):
            return self._fit(data, resume, progress, callback)

    def _fit(self, data: Any, resume: bool, progress: bool, callback) -> list[TrainRun]:
        B, d = self.batch_size, self.d_in
        if isinstance(data, np.ndarray) or (
            isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple))
        ):  # array-likes become one tensor, as batch_stream reads them
            data = torch.as_tensor(np.asarray(data, dtype=np.float32))
        # a tensor is shuffled per seed (each SAE sees its lone run's batches); else one stream
        keys = [t.tcfg.seed if isinstance(data, Tensor) else 0 for t in self.trainers]
        streams = {
            k: batch_stream(data, B, d, k, start=self.steps_done) for k in dict.fromkeys(keys)
        }
        if not resume:
            n_init = [max(1, math.ceil(t.tcfg.init_sample_tokens / B)) for t in self.trainers]
            heads = {}
            for k, s in streams.items():
                want = max(n for n, kk in zip(n_init, keys) if kk == k)
                heads[k] = [_checked(b, i, B, d) for i, b in zip(range(want), s)]
                streams[k] = itertools.chain(heads[k], s)
            for t, k, n in zip(self.trainers, keys, n_init):
                t.init_from_data(torch.cat(heads[k][:n]))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.n_steps, initial=self.steps_done, desc="grid", leave=False)
        every = self.trainers[0].tcfg.checkpoint_every
        while self.steps_done < self.n_steps:
            step = self.steps_done
            end = self.n_steps
            if every:  # a block ends where a checkpoint is due
                end = min(end, (step // every + 1) * every)
            end = min(end, step + (self.block_steps if self.by_member else 1))
            block = []
            for _ in range(step, end):
                batches = {}
                for k, stream in streams.items():
                    batches[k] = next(stream, None)
                if any(b is None for b in batches.values()):
                    break
                block.append([batches[k] for k in keys])
            rows = self._run(block) if block else []
            for i, r in enumerate(rows):
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    callback(step + i, r)
            if len(block) < end - step:
                self.save_checkpoint()
                raise ValueError(
                    f"the data ran out after {self.steps_done} batches but total_tokens asks "
                    f"for {self.n_steps}; pass more data or lower total_tokens."
                )
            if every and self.steps_done % every == 0 and self.steps_done < self.n_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.save_checkpoint()
        runs = []
        for t in self.trainers:
            t.sae.eval()
            runs.append(
                TrainRun(
                    sae=t.sae,
                    history=pd.DataFrame(t.rows),
                    stats=t.stats,
                    cfg=t.cfg,
                    tcfg=t.tcfg,
                    checkpoint_dir=t.checkpoint_dir,
                    info={"lr": t.base_lr, "k_aux": t.k_aux},
                )
            )
        return runs


def train_many(
    members: Sequence[tuple[SAEConfig, TrainConfig]],
    data: Any,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool = False,
    callback: Callable[[int, list[dict[str, float] | None]], None] | None = None,
) -> list[TrainRun]:
    """Train every (SAEConfig, TrainConfig) of ``members`` in one pass over ``data``; each
    result equals ``train(cfg, tcfg, data)`` (to float tolerance). Checkpoints of the whole
    set go to ``checkpoint_dir``; ``resume_from`` continues an interrupted grid."""
    if checkpoint_dir is None and resume_from is not None:
        checkpoint_dir = resume_from
    g = GridTrainer(members, checkpoint_dir)
    if resume_from is not None:
        g.load_checkpoint(resume_from)
    return g.fit(data, resume=resume_from is not None, progress=progress, callback=callback)


__all__ = ["GridTrainer", "train_many"]
