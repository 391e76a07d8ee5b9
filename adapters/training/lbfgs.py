"""Full-batch L-BFGS with a strong-Wolfe line search, outside ``torch.optim``.

The linear head used to be fitted with ``torch.optim.LBFGS``. Constructing any ``torch.optim``
optimiser imports ``torch._dynamo`` (its ``_disable_dynamo`` wrappers do, on first use): 2.6 s of
a retrain job's start-up on 2 busy cores, to compile nothing (BENCHMARKS.md, section 14). This
module is the same algorithm without that machinery: a line-for-line port of
``torch.optim.lbfgs`` (PyTorch 2.x, BSD-3-Clause; itself ported from Lua torch's ``lbfgs.lua`` and
``lswolfe.lua``) on two parameter tensors, with the same arithmetic in the same order. Given the
same objective it takes bitwise the same steps (``tests/test_training.py`` checks this against
``torch.optim.LBFGS``).

One difference, which changes no step: ``torch.optim.LBFGS.step`` evaluates the objective again
at the point where the previous call stopped; :meth:`Lbfgs.run` keeps the value and gradient it
already has there. Like ``step``, each :meth:`Lbfgs.run` counts that point as one evaluation of its
budget (``max_iter * 5 // 4``), so every call ends where ``step`` would have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Objective = Callable[[], torch.Tensor]
"""Evaluates the objective at the parameters' current values, leaving its gradient in ``.grad``."""

Scalar = Any
"""A Python float or a 0-d tensor: as in the original, step lengths and curvature terms are
either, depending on where they come from, and the arithmetic must stay the same."""


def _cubic_interpolate(
    x1: Scalar, f1: float, g1: Scalar, x2: Scalar, f2: float, g2: Scalar,
    bounds: tuple[Scalar, Scalar] | None = None,
) -> Scalar:
    # Minimiser of the cubic through two points with their values and derivatives.
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt() if isinstance(d2_square, torch.Tensor) else d2_square**0.5
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(  # noqa: C901, PLR0912, PLR0915 - kept in the shape of the original
    obj_func: Callable[[list[torch.Tensor], Scalar, torch.Tensor], tuple[float, torch.Tensor]],
    x: list[torch.Tensor],
    t: Scalar,
    d: torch.Tensor,
    f: float,
    g: torch.Tensor,
    gtd: torch.Tensor,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
) -> tuple[float, torch.Tensor, Scalar, int]:
    d_norm = d.abs().max()
    g = g.clone(memory_format=torch.contiguous_format)
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = g_new.dot(d)

    # Bracket an interval containing a point satisfying the Wolfe criteria.
    t_prev: Scalar = 0
    f_prev, g_prev, gtd_prev = f, g, gtd
    done = False
    ls_iter = 0
    bracket: list[Scalar] = []
    bracket_f: list[float] = []
    bracket_g: list[torch.Tensor] = []
    bracket_gtd: list[torch.Tensor] = []
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                               bounds=(min_step, max_step))
        t_prev = tmp
        f_prev = f_new
        g_prev = g_new.clone(memory_format=torch.contiguous_format)
        gtd_prev = gtd_new
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1

    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    # Zoom: refine the bracket until a point satisfies the criteria.
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0],
                               bracket[1], bracket_f[1], bracket_gtd[1])
        # Too close to a boundary: after insufficient progress, or on the boundary, move to
        # 0.1 of the bracket's length away from the nearest end.
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo not satisfied, or not lower than the lowest point.
            bracket[high_pos] = t
            bracket_f[high_pos] = f_new
            bracket_g[high_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[high_pos] = gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos] = bracket[low_pos]
                bracket_f[high_pos] = bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
            bracket[low_pos] = t
            bracket_f[low_pos] = f_new
            bracket_g[low_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[low_pos] = gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


@dataclass
class Lbfgs:
    """L-BFGS (strong-Wolfe line search) on ``params``, resumable in blocks of iterations.

    Defaults are ``torch.optim.LBFGS``'s as the linear head used them: ``lr`` 1, ``history_size``
    20; ``tolerance_grad`` and ``tolerance_change`` as given.
    """

    params: Sequence[torch.Tensor]
    objective: Objective
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    history_size: int = 20
    lr: float = 1.0
    n_iter: int = 0
    """Iterations run so far, over all calls."""
    func_evals: int = 0
    """Objective evaluations so far (the ones ``torch.optim.LBFGS`` would repeat excluded)."""
    _loss: float | None = None
    _flat_grad: torch.Tensor | None = None
    _d: torch.Tensor | None = None
    _t: Scalar = 0.0
    _old_dirs: list[torch.Tensor] = field(default_factory=list)
    _old_stps: list[torch.Tensor] = field(default_factory=list)
    _ro: list[Scalar] = field(default_factory=list)
    _al: list[Scalar] = field(default_factory=list)
    _h_diag: Scalar = 1
    _prev_flat_grad: torch.Tensor | None = None

    def _gather_flat_grad(self) -> torch.Tensor:
        views = [p.new(p.numel()).zero_() if p.grad is None else p.grad.view(-1)
                 for p in self.params]
        return torch.cat(views, 0)

    def _add_grad(self, step_size: Scalar, update: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            numel = p.numel()
            p.add_(update[offset : offset + numel].view_as(p), alpha=step_size)
            offset += numel

    def _evaluate(self) -> tuple[float, torch.Tensor]:
        with torch.enable_grad():
            loss = float(self.objective().detach())
        self.func_evals += 1
        return loss, self._gather_flat_grad()

    def _directional_evaluate(
        self, x: list[torch.Tensor], t: Scalar, d: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        self._add_grad(t, d)
        loss, flat_grad = self._evaluate()
        for p, data in zip(self.params, x, strict=True):
            p.copy_(data)
        return loss, flat_grad

    @torch.no_grad()
    def run(self, max_iter: int) -> tuple[float, int]:  # noqa: C901, PLR0912 - as the original
        """Up to ``max_iter`` iterations (one ``torch.optim.LBFGS.step`` with that ``max_iter``);
        returns the objective where the call started and the iterations run."""
        max_eval = max_iter * 5 // 4
        if self._loss is None or self._flat_grad is None:
            self._loss, self._flat_grad = self._evaluate()
        # The point was evaluated already (``step`` would evaluate it again): it still counts as
        # one evaluation of this call's budget, as in ``step``.
        orig_loss = loss = self._loss
        flat_grad = self._flat_grad
        current_evals = 1
        if flat_grad.abs().max() <= self.tolerance_grad:
            return orig_loss, 0

        d, t = self._d, self._t
        old_dirs, old_stps, ro = self._old_dirs, self._old_stps, self._ro
        h_diag = self._h_diag
        prev_flat_grad = self._prev_flat_grad
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            self.n_iter += 1
            if self.n_iter == 1:
                d = flat_grad.neg()
                old_dirs, old_stps, ro = [], [], []
                h_diag = 1
            else:
                assert d is not None and prev_flat_grad is not None
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:
                    if len(old_dirs) == self.history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    h_diag = ys / y.dot(y)
                num_old = len(old_dirs)
                if not self._al:
                    self._al = [None] * self.history_size
                al = self._al
                q = flat_grad.neg()
                for i in range(num_old - 1, -1, -1):
                    al[i] = old_stps[i].dot(q) * ro[i]
                    q.add_(old_dirs[i], alpha=-al[i])
                d = r = torch.mul(q, h_diag)
                for i in range(num_old):
                    be_i = old_dirs[i].dot(r) * ro[i]
                    r.add_(old_stps[i], alpha=al[i] - be_i)

            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss

            first: Scalar = min(1.0, 1.0 / flat_grad.abs().sum()) if self.n_iter == 1 else None
            t = self.lr if first is None else first * self.lr
            gtd = flat_grad.dot(d)
            if gtd > -self.tolerance_change:
                break

            x_init = [p.clone(memory_format=torch.contiguous_format) for p in self.params]
            loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                self._directional_evaluate, x_init, t, d, loss, flat_grad, gtd,
                max_ls=max_eval - current_evals,
            )
            self._add_grad(t, d)
            opt_cond = flat_grad.abs().max() <= self.tolerance_grad
            current_evals += ls_func_evals

            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= self.tolerance_change:
                break
            if abs(loss - prev_loss) < self.tolerance_change:
                break

        self._loss, self._flat_grad = loss, flat_grad
        self._d, self._t = d, t
        self._old_dirs, self._old_stps, self._ro = old_dirs, old_stps, ro
        self._h_diag = h_diag
        self._prev_flat_grad = prev_flat_grad
        return orig_loss, n_iter
