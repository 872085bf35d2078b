"""L-BFGS with one curvature history and one step length per edit group, one evaluation per step.

    losses = torch.zeros(n_groups)             # the module writes each step's per-group loss here
    opt = GroupLBFGS([delta_v], lr=0.5, max_move=4.0, group_loss=lambda: losses)
    opt.step(closure)                          # closure: forward, per-group loss into `losses`, backward

``delta_v`` is ``[groups, ...]``: the groups are independent problems that share one forward. Each
group keeps its own (s, y) pairs, so one group's curvature never bends another's direction. A step
evaluates the loss and gradient once (torch's ``LBFGS`` evaluates the start point of every
``step`` again and runs a shared line search over all groups). In place of a line search, a group
whose loss rose since its last accepted point goes back half-way to that point (its gradient there
still adds a curvature pair); after ``restart`` such steps in a row its history is emptied and it
steps from that point along its negative gradient. A group whose loss did not rise takes the
L-BFGS step from where it is. The first step, and a step after the history was emptied, moves the
largest element by ``lr`` along the negative gradient; no step moves any element by more than
``max_move``.
"""
from __future__ import annotations

from typing import Callable

import torch


class GroupLBFGS(torch.optim.Optimizer):
    """Per-group L-BFGS on one parameter whose first dimension is the group.

    Args:
        params: one tensor ``[groups, ...]``.
        lr: the largest element's move on a steepest-descent step (the first one).
        max_move: no element moves by more than this in one step.
        history: (s, y) pairs kept per group.
        restart: steps in a row whose loss rose after which a group's history is emptied.
        group_loss: returns the per-group loss ``[groups]`` of the closure's last evaluation.
    """

    def __init__(self, params, lr: float, max_move: float, history: int = 10, restart: int = 3,
                 group_loss: Callable[[], torch.Tensor] | None = None) -> None:
        super().__init__(params, {"lr": lr, "max_move": max_move, "history": history, "restart": restart})
        if len(self.param_groups) != 1 or len(self.param_groups[0]["params"]) != 1:
            raise ValueError("GroupLBFGS takes one parameter tensor")
        if group_loss is None:
            raise ValueError("GroupLBFGS needs group_loss: the per-group loss of the last evaluation")
        self.group_loss = group_loss

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise ValueError("GroupLBFGS evaluates the loss itself: pass a closure")
        with torch.enable_grad():
            loss = closure()
        group = self.param_groups[0]
        x = group["params"][0]
        if x.grad is None:
            return loss
        n = x.shape[0]
        xf, g = x.detach().reshape(n, -1), x.grad.detach().reshape(n, -1).float()
        f = self.group_loss().detach().float().to(x.device)
        st = self.state[x]
        if not st:
            st.update(S=[], Y=[], x_acc=xf.clone(), g_acc=g.clone(), f_acc=f.clone(), x_last=xf.clone(),
                      g_last=g.clone(), fresh=torch.ones(n, dtype=torch.bool, device=x.device),
                      rejects=torch.zeros(n, dtype=torch.long, device=x.device))
        else:
            s, y = xf - st["x_last"], g - st["g_last"]
            st["S"].append(s)
            st["Y"].append(y)
            if len(st["S"]) > group["history"]:
                st["S"].pop(0)
                st["Y"].pop(0)
        rose = f > st["f_acc"]
        take = ~rose
        st["rejects"] = torch.where(rose, st["rejects"] + 1, torch.zeros_like(st["rejects"]))
        restart = st["rejects"] >= group["restart"]
        if restart.any():   # empty these groups' history: their pairs count no more (s.y = 0)
            for pair in (*st["S"], *st["Y"]):
                pair[restart] = 0.0
            st["rejects"][restart] = 0
        st["x_acc"] = torch.where(take[:, None], xf, st["x_acc"])
        st["g_acc"] = torch.where(take[:, None], g, st["g_acc"])
        st["f_acc"] = torch.where(take, f, st["f_acc"])
        st["x_last"], st["g_last"] = xf.clone(), g.clone()

        direction, curved = self._direction(st, g)
        direction = torch.where((st["fresh"] | ~curved)[:, None], self._steepest(g, group["lr"]), direction)
        st["fresh"] = st["fresh"] & rose      # a group that rose on its first step retries it
        biggest = direction.abs().amax(1, keepdim=True)
        direction = direction * (group["max_move"] / biggest.clamp(min=1e-12)).clamp(max=1.0)
        new = torch.where(rose[:, None], 0.5 * (st["x_acc"] + xf), xf + direction)
        new = torch.where(restart[:, None], st["x_acc"] + self._steepest(st["g_acc"], group["lr"]), new)
        x.copy_(new.view_as(x).to(x.dtype))
        return loss

    @staticmethod
    def _steepest(g: torch.Tensor, lr: float) -> torch.Tensor:
        """The negative gradient, scaled so that its largest element is ``lr``."""
        return -g * (lr / g.abs().amax(1, keepdim=True).clamp(min=1e-12))

    @staticmethod
    def _direction(st: dict, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-H g per group (two-loop recursion) and whether the group has a pair with positive
        curvature (s.y > 0); a pair without is left out."""
        q, alphas, rhos = g.clone(), [], []
        for s, y in zip(reversed(st["S"]), reversed(st["Y"])):
            sy = (s * y).sum(1)
            rho = torch.where(sy > 1e-10, 1.0 / sy.clamp(min=1e-10), torch.zeros_like(sy))
            a = rho * (s * q).sum(1)
            q -= a[:, None] * y
            alphas.append(a)
            rhos.append(rho)
        gamma = torch.ones(g.shape[0], device=g.device)
        curved = torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
        for y, rho in zip(reversed(st["Y"]), rhos):   # H0 = s.y / y.y of the newest pair with curvature
            ok = (rho > 0) & ~curved
            gamma = torch.where(ok, 1.0 / (rho * (y * y).sum(1)).clamp(min=1e-12), gamma)
            curved |= ok
        r = gamma[:, None] * q
        for (s, y), a, rho in zip(zip(st["S"], st["Y"]), reversed(alphas), reversed(rhos)):
            b = rho * (y * r).sum(1)
            r += s * (a - b)[:, None]
        return -r, curved
