"""Exact Gaussian losses of many two-layer networks at once, in torch.

The torch twin of `theory.gaussian` (same formulas, same guards), batched over a leading
run dimension R so that a whole batch of simulations gets its exact population losses in
a few tensor operations. `tests/sims/test_moments.py` holds it equal to the numpy version.

    E[(a.x)(b.x)]           = a^T cov b
    E[relu(a.x)(b.x)]       = a^T cov b / 2
    E[relu(a.x) relu(b.x)]  = |a||b| / (2 pi) (sin t + (pi - t) cos t)   (arc-cosine kernel)
"""
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from theory.network import check_activation


def relu_kernel(Ba, Bb, cov):
    """E[relu(Ba x) relu(Bb x)^T], x ~ N(0, cov): shape (..., ka, kb).

    Ba (..., ka, d), Bb (..., kb, d), cov (..., d, d); leading dimensions broadcast.
    """
    Ca = Ba @ cov
    cross = Ca @ Bb.transpose(-1, -2)
    norm_a = (Ca * Ba).sum(-1).clamp(min=0).sqrt()
    norm_b = ((Bb @ cov) * Bb).sum(-1).clamp(min=0).sqrt()
    product = norm_a[..., :, None] * norm_b[..., None, :]
    sine_part = (product**2 - cross**2).clamp(min=0).sqrt()      # |a||b| sin t
    theta = torch.atan2(sine_part, cross)
    kernel = (sine_part + (math.pi - theta) * cross) / (2 * math.pi)
    return torch.where(product > 0, kernel, torch.zeros_like(kernel))


def cross_moment(Ba, activation_a, Bb, activation_b, cov):
    """E[phi_a(Ba x) phi_b(Bb x)^T], x ~ N(0, cov): shape (..., ka, kb); broadcasts."""
    check_activation(activation_a)
    check_activation(activation_b)
    if activation_a == activation_b == "relu":
        return relu_kernel(Ba, Bb, cov)
    linear = Ba @ cov @ Bb.transpose(-1, -2)
    return linear if activation_a == activation_b == "linear" else linear / 2


@dataclass(frozen=True)
class Target:
    """Where R runs are scored: teacher y = tv^T phi_t(tB x), x ~ sum_j weights[j] N(0, covs[j]).

    Fields (tensors share dtype and device):
        teacher_v: (R, kt).  teacher_B: (R, kt, d).  teacher_activation: "linear" | "relu".
        weights: (R, J) mixture weights (rows sum to 1; padding components have weight 0).
        covs: (R, J, d, d) component covariances.
    """
    teacher_v: torch.Tensor
    teacher_B: torch.Tensor
    teacher_activation: str
    weights: torch.Tensor
    covs: torch.Tensor

    def select(self, index):
        """The runs `index` (a 1-d index tensor) of this target."""
        return Target(self.teacher_v[index], self.teacher_B[index], self.teacher_activation,
                      self.weights[index], self.covs[index])

    @cached_property
    def _teacher_moments(self):
        """E[y^2] per component, (R, J); computed once (the teacher never changes)."""
        tv = self.teacher_v[:, None, None, :]                                  # (R, 1, 1, kt)
        tB = self.teacher_B[:, None]                                           # (R, 1, kt, d)
        act = self.teacher_activation
        return (tv @ cross_moment(tB, act, tB, act, self.covs)
                @ tv.transpose(-1, -2))[..., 0, 0]

    def _check_nets(self, v, B) -> None:
        """v (R, k) and B (R, k, d) of this target's R runs, dtype and d: torch would
        broadcast a head of one run over all of them (run 0's head with run 1's B)."""
        runs, d = self.teacher_B.shape[0], self.teacher_B.shape[-1]
        if not (isinstance(v, torch.Tensor) and isinstance(B, torch.Tensor)):
            raise ValueError(f"v and B must be torch tensors, got {type(v).__name__} and "
                             f"{type(B).__name__}")
        if (v.ndim != 2 or B.ndim != 3 or v.shape[0] != runs or B.shape[0] != runs
                or B.shape[1] != v.shape[1] or B.shape[2] != d):
            raise ValueError(f"expected v (R, k) and B (R, k, d) with R = {runs} runs and d = "
                             f"{d}, got v {tuple(v.shape)} and B {tuple(B.shape)}")
        if v.dtype != self.covs.dtype or B.dtype != self.covs.dtype:
            raise ValueError(f"v and B must be {self.covs.dtype} like the target, got "
                             f"{v.dtype} and {B.dtype}")

    def label_energy(self):
        """E[y^2] per run, shape (R,): the loss of predicting 0."""
        return (self.weights * self._teacher_moments).sum(-1).clamp(min=0)

    def loss(self, v, B, activation):
        """Exact E[(v^T phi(B x) - y)^2] per run, shape (R,), for v (R, k), B (R, k, d).

        Linear net and teacher use the direct form (w - w*)^T cov (w - w*), which has no
        cancellation (an exact fit scores ~1e-32, not ~1e-16), as in `theory`.
        """
        self._check_nets(v, B)
        if activation == self.teacher_activation == "linear":
            diff = (B.transpose(1, 2) @ v[..., None]
                    - self.teacher_B.transpose(1, 2) @ self.teacher_v[..., None])  # (R, d, 1)
            diff = diff[:, None]                                                     # (R, 1, d, 1)
            per_component = (diff.transpose(-1, -2) @ self.covs @ diff)[..., 0, 0]
            return (self.weights * per_component).sum(-1)
        # v^T E[h h^T] v - 2 v^T E[h h*^T] v* + E[y^2], h = phi(B x), per component.
        B_, v_ = B[:, None], v[:, None, None, :]                                 # (R, 1, ...)
        own = (v_ @ cross_moment(B_, activation, B_, activation, self.covs)
               @ v_.transpose(-1, -2))[..., 0, 0]
        cross = (v_ @ cross_moment(B_, activation, self.teacher_B[:, None],
                                   self.teacher_activation, self.covs)
                 @ self.teacher_v[:, None, :, None])[..., 0, 0]
        per_component = own - 2 * cross + self._teacher_moments
        # Each component's quadratic form is >= 0 exactly; rounding can leave ~-1e-17, which
        # is clipped per component, as in theory.
        return (self.weights * per_component.clamp(min=0)).sum(-1)
