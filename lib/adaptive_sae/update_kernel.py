r"""A small SAE's parameter update: two compiled passes (CPU, numba) around Adam's fused kernel.

After its gradients, a step projects the decoder's gradient onto the tangent of the unit rows
(``SparseAutoencoder.remove_parallel_grad``), clips the gradient norm (``clip_grad_norm_``),
takes Adam's step (``torch.optim.Adam(fused=True)``) and renormalises the decoder rows
(``normalize_decoder``). At the suite's own sizes (d=64, F=512: 66 k parameters) those are
about fifteen PyTorch calls and a quarter of a millisecond, two thirds of the dense product;
at d=512, F=8192 they are several passes over 8.4 M parameters. Here:

    pass 1 (compiled):  g_dec[f] −= (g_dec[f]·W_dec[f]) W_dec[f];  ‖g‖ = √(Σ over every gradient of g²)
                        (the caller stops on a non-finite norm before anything changes)
    clipping:           g ← min(1, clip / (‖g‖ + 10⁻⁶)) · g           (only where it binds)
    Adam:               torch's fused kernel on flat views of each parameter, its gradient and
                        moments (twice as fast on the column-major W_enc as on the 2-D tensor)
    pass 2 (compiled):  W_dec[f] ← W_dec[f] / ‖W_dec[f]‖

Adam's state stays in the optimiser (its ``state_dict`` and the checkpoints are unchanged) and
its arithmetic is torch's; the projection and the norms sum in another order (float64), so the
result equals the torch path's to float tolerance, not bit for bit
(``tests/test_update_kernel.py``). It applies on a CPU to float32 or float64 parameters stored
densely with gradients and moments of the same layout, Adam without weight decay, AMSGrad or
maximise, in one process; ``ADAPTIVE_SAE_KERNELS=0`` turns it off with the other kernels.

Training on a CPU also flushes subnormal floats to zero (:func:`denormals_flushed`, with the
kernels): Adam's first moment of a parameter whose gradient stays zero (the rows and columns
of a dead feature) decays by β₁ = 0.9 a step into the subnormal range and stays there (0.9 ×
4·2⁻¹⁴⁹ rounds back to 4·2⁻¹⁴⁹), where x86 arithmetic is far slower: with a third of the
moments there, Adam's step took 6× as long. The moments flushed to zero change no weight
(their updates are below float32's resolution).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from . import selection_kernels

_compiled: dict | None = None

NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


# The kernels, in the subset of Python numba compiles.
def _sumsq(a):  # pragma: no cover - compiled (fastmath: the sum vectorises)
    s = 0.0
    for i in range(a.shape[0]):
        s += np.float64(a[i]) * a[i]
    return s


def _project_and_sumsq(W_dec, G_dec, g_enc, g_b_enc, g_b_dec):  # pragma: no cover - compiled
    """Project each decoder row's gradient off the row, in place; Σ g² over every gradient."""
    F, d = W_dec.shape
    s = 0.0
    for f in range(F):
        dot = 0.0
        for j in range(d):
            dot += np.float64(G_dec[f, j]) * W_dec[f, j]
        for j in range(d):
            g = G_dec[f, j] - dot * W_dec[f, j]
            G_dec[f, j] = g
            s += np.float64(G_dec[f, j]) * G_dec[f, j]
    return s + _sumsq(g_enc) + _sumsq(g_b_enc) + _sumsq(g_b_dec)


def _renormalize_rows(W):  # pragma: no cover - compiled (fastmath: the norms vectorise)
    F, d = W.shape
    for f in range(F):
        s = 0.0
        for j in range(d):
            s += np.float64(W[f, j]) * W[f, j]
        inv = W.dtype.type(1.0 / max(np.sqrt(s), 1e-12))
        for j in range(d):
            W[f, j] *= inv


def _kernels() -> dict | None:
    global _compiled, _sumsq
    if _compiled is None and selection_kernels.numba_available():
        _sumsq = selection_kernels.jit(_sumsq, fastmath=True)
        _compiled = {
            "project": selection_kernels.jit(_project_and_sumsq, fastmath=True),
            "renormalize": selection_kernels.jit(_renormalize_rows, fastmath=True),
        }
    return _compiled


def _dense(t: Tensor) -> bool:
    """Whether t's elements fill its storage span without gaps or overlap (any order of dims):
    its flat memory-order view is then every element once."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def _flat(t: Tensor) -> Tensor:
    """A dense tensor's elements in memory order, as a 1-D view (no copy)."""
    return t.detach().as_strided((t.numel(),), (1,))


def _plain_adam(opt: torch.optim.Optimizer) -> bool:
    """One Adam group without weight decay, AMSGrad, maximise or a tensor learning rate."""
    if len(opt.param_groups) != 1:
        return False
    group = opt.param_groups[0]
    return not (
        group["weight_decay"]
        or group.get("amsgrad")
        or group.get("maximize")
        or isinstance(group["lr"], Tensor)
    )


def applies(sae, opt: torch.optim.Optimizer) -> bool:
    """Whether the kernels take this SAE's update: kernels on and numba present, CPU parameters
    in float32/64 stored densely, each with a gradient and Adam moments of its layout (after
    the first step: before it, the moments do not exist yet), one Adam group without weight
    decay, AMSGrad, maximise or a tensor learning rate."""
    if not (selection_kernels.use_kernels and _plain_adam(opt)):
        return False
    for name in NAMES:
        p = getattr(sae, name)
        g, state = p.grad, opt.state.get(p)
        if (
            p.device.type != "cpu"
            or p.dtype not in (torch.float32, torch.float64)
            or g is None
            or g.dtype != p.dtype
            or not state
            or not _dense(p)
            or any(t.stride() != p.stride() for t in (g, state["exp_avg"], state["exp_avg_sq"]))
        ):
            return False
    return sae.W_dec.is_contiguous() and selection_kernels.numba_available()


class UpdatePlan:
    """One SAE's update by the kernels: the arrays they read and write, made once and reused
    while the SAE's parameters, gradients and Adam state stay the same tensors (a training
    step writes its gradients into the same buffers; a restored optimiser, a gradient
    replaced by autograd or a switched-off kernel make :func:`plan_for` build a new plan)."""

    def __init__(self, sae, opt: torch.optim.Optimizer):
        self.group = opt.param_groups[0]
        self.params = [getattr(sae, name) for name in NAMES]
        self.addresses = [p.data_ptr() for p in self.params]  # `p.data = ...` moves them
        self.grads = [p.grad for p in self.params]
        self.states = [opt.state[p] for p in self.params]
        self.moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in self.states]
        self.steps = [s["step"] for s in self.states]
        g = dict(zip(NAMES, self.grads))
        self.W_dec = sae.W_dec.detach().numpy()
        self.to_project = (
            self.W_dec,
            g["W_dec"].numpy(),
            _flat(g["W_enc"]).numpy(),
            _flat(g["b_enc"]).numpy(),
            _flat(g["b_dec"]).numpy(),
        )
        self.flat = (
            [_flat(p) for p in self.params],
            [_flat(g) for g in self.grads],
            [_flat(m) for m, _ in self.moments],
            [_flat(v) for _, v in self.moments],
        )

    def holds(self, sae, opt: torch.optim.Optimizer) -> bool:
        """Whether this plan still describes (sae, opt): the same tensors, by identity, and
        the parameters at the same addresses."""
        if not (selection_kernels.use_kernels and opt.param_groups[0] is self.group):
            return False
        if not _plain_adam(opt):
            return False
        for name, p, at, g, st, (m, v), t in zip(
            NAMES, self.params, self.addresses, self.grads, self.states, self.moments, self.steps
        ):
            if getattr(sae, name) is not p or p.data_ptr() != at or p.grad is not g:
                return False
            if opt.state.get(p) is not st:
                return False
            if st["exp_avg"] is not m or st["exp_avg_sq"] is not v or st["step"] is not t:
                return False
        return True


def plan_for(sae, opt: torch.optim.Optimizer, cached: UpdatePlan | None = None):
    """``cached`` where it still holds for (sae, opt), else a new plan where the kernels apply
    (:func:`applies`), else None."""
    if cached is not None and cached.holds(sae, opt):
        return cached
    return UpdatePlan(sae, opt) if applies(sae, opt) else None


@torch.no_grad()
def project_and_norm(plan: UpdatePlan) -> float:
    """Pass 1: the decoder gradient projected (in place); the total gradient norm."""
    return math.sqrt(_kernels()["project"](*plan.to_project))


@torch.no_grad()
def clip_adam_and_renormalize(plan: UpdatePlan, gnorm: float, clip: float) -> None:
    """Pass 2: the gradients scaled to norm ``clip`` at most (clip > 0), Adam's step with the
    optimiser's settings and state (torch's fused kernel, on flat views: twice as fast on
    the column-major W_enc), the decoder rows back to unit norm."""
    group = plan.group
    coef = clip / (gnorm + 1e-6) if clip > 0 else 1.0
    if coef < 1.0:
        torch._foreach_mul_(plan.grads, coef)
    torch._foreach_add_(plan.steps, 1)  # as Adam does before its fused kernel, which reads t
    beta1, beta2 = group["betas"]
    torch._fused_adam_(
        *plan.flat,
        [],
        plan.steps,
        lr=float(group["lr"]),
        beta1=float(beta1),
        beta2=float(beta2),
        weight_decay=0.0,
        eps=float(group["eps"]),
        amsgrad=False,
        maximize=False,
    )
    _kernels()["renormalize"](plan.W_dec)


def _flushing() -> bool:
    """Whether this thread flushes subnormal floats to zero now (torch has no getter)."""
    return float(torch.tensor(1e-310, dtype=torch.float64) * 2.0) == 0.0


@contextlib.contextmanager
def denormals_flushed(device: torch.device | str) -> Iterator[None]:
    """Within: subnormal floats flushed to zero on this thread (``torch.set_flush_denormal``),
    where ``device`` is a CPU, the fast paths are on and the processor supports it; the mode
    found on entry is restored on exit."""
    if not (selection_kernels.use_kernels and torch.device(device).type == "cpu"):
        yield
        return
    was = _flushing()
    changed = torch.set_flush_denormal(True)  # False: not x86 with SSE3 or AArch64
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(was)


__all__ = [
    "UpdatePlan",
    "applies",
    "plan_for",
    "project_and_norm",
    "clip_adam_and_renormalize",
    "denormals_flushed",
]
