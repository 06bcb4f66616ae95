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
"""

from __future__ import annotations

import math

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


def applies(sae, opt: torch.optim.Optimizer) -> bool:
    """Whether the kernels take this SAE's update: kernels on and numba present, CPU parameters
    in float32/64 stored densely, each with a gradient and Adam moments of its layout (after
    the first step: before it, the moments do not exist yet), one Adam group without weight
    decay, AMSGrad, maximise or a tensor learning rate."""
    if not (selection_kernels.use_kernels and len(opt.param_groups) == 1):
        return False
    group = opt.param_groups[0]
    if (
        group["weight_decay"]
        or group.get("amsgrad")
        or group.get("maximize")
        or isinstance(group["lr"], Tensor)
    ):
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


@torch.no_grad()
def project_and_norm(sae) -> float:
    """Pass 1: the decoder gradient projected (in place); the total gradient norm."""
    g = {name: getattr(sae, name).grad for name in NAMES}
    s = _kernels()["project"](
        sae.W_dec.detach().numpy(),
        g["W_dec"].numpy(),
        _flat(g["W_enc"]).numpy(),
        _flat(g["b_enc"]).numpy(),
        _flat(g["b_dec"]).numpy(),
    )
    return math.sqrt(s)


@torch.no_grad()
def clip_adam_and_renormalize(sae, opt: torch.optim.Optimizer, gnorm: float, clip: float):
    """Pass 2: the gradients scaled to norm ``clip`` at most (clip > 0), Adam's step with the
    optimiser's settings and state (torch's fused kernel, on flat views: twice as fast on
    the column-major W_enc), the decoder rows back to unit norm."""
    group = opt.param_groups[0]
    params = [getattr(sae, name) for name in NAMES]
    grads = [p.grad for p in params]
    coef = clip / (gnorm + 1e-6) if clip > 0 else 1.0
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    state = [opt.state[p] for p in params]
    steps = [s["step"] for s in state]
    torch._foreach_add_(steps, 1)  # as Adam does before its fused kernel, which reads t
    beta1, beta2 = group["betas"]
    torch._fused_adam_(
        [_flat(p) for p in params],
        [_flat(g) for g in grads],
        [_flat(s["exp_avg"]) for s in state],
        [_flat(s["exp_avg_sq"]) for s in state],
        [],
        steps,
        lr=float(group["lr"]),
        beta1=float(beta1),
        beta2=float(beta2),
        weight_decay=0.0,
        eps=float(group["eps"]),
        amsgrad=False,
        maximize=False,
    )
    _kernels()["renormalize"](sae.W_dec.detach().numpy())


__all__ = ["applies", "project_and_norm", "clip_adam_and_renormalize"]
