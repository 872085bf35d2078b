"""``model.optimizer lbfgs``: L-BFGS with one curvature history per edit group (editing/quasi_newton.py)."""
import pytest
import torch

from lafn_lightning.editing.quasi_newton import GroupLBFGS


def _quadratics(n_groups: int, dim: int = 12, seed: int = 0):
    """Per group an ill-conditioned quadratic 0.5 (x - c)' A (x - c) (condition number 1000)."""
    gen = torch.Generator().manual_seed(seed)
    problems = []
    for _ in range(n_groups):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        a = q @ torch.diag(torch.logspace(0, 3, dim)) @ q.T
        problems.append((a, torch.randn(dim, generator=gen)))
    return problems


def _losses(x: torch.Tensor, problems) -> torch.Tensor:
    """Each group's quadratic at its row of ``x``."""
    return torch.stack([0.5 * (x[i] - c) @ a @ (x[i] - c) for i, (a, c) in enumerate(problems)])


def _run(problems, steps: int, points: list | None = None, **kwargs):
    """Minimise every group's quadratic with one GroupLBFGS; per step the loss of each group and the max
    move; the final point (``points``, if given, gets each evaluated point)."""
    x = torch.zeros(len(problems), problems[0][1].numel(), requires_grad=True)
    losses = torch.zeros(len(problems))
    opt = GroupLBFGS([x], group_loss=lambda: losses, **kwargs)
    trace, moves = [], []

    def closure():
        opt.zero_grad()
        per = _losses(x, problems)
        losses.copy_(per.detach())
        per.sum().backward()
        return per.sum()

    for _ in range(steps):
        before = x.detach().clone()
        if points is not None:
            points.append(before)
        opt.step(closure)
        trace.append(losses.clone())
        moves.append((x.detach() - before).abs().amax(1))
    return torch.stack(trace), torch.stack(moves), x.detach()


def test_each_group_follows_its_own_path_as_if_it_were_alone():
    problems = _quadratics(3)
    together, _, x_all = _run(problems, 25, lr=0.5, max_move=4.0)
    for i, problem in enumerate(problems):
        alone, _, x_one = _run([problem], 25, lr=0.5, max_move=4.0)
        assert torch.allclose(together[:, i], alone[:, 0], rtol=1e-4, atol=1e-7)
        assert torch.allclose(x_all[i], x_one[0], atol=1e-5)


def test_reaches_the_minimum_of_an_ill_conditioned_quadratic_where_adam_does_not():
    problems = _quadratics(2, seed=1)
    trace, moves, x = _run(problems, 60, lr=0.5, max_move=4.0)
    start = trace[0]
    assert (trace[-1] < 1e-6 * start).all()
    for i, (a, c) in enumerate(problems):
        assert torch.allclose(x[i], c, atol=1e-2)
    assert (moves <= 4.0 + 1e-6).all()
    assert torch.allclose(moves[0], torch.full_like(moves[0], 0.5))   # first step: steepest, largest move lr

    y = torch.zeros(2, problems[0][1].numel(), requires_grad=True)   # Adam at the paper's lr, same steps
    adam = torch.optim.Adam([y], lr=0.5)
    for _ in range(60):
        adam.zero_grad()
        per = _losses(y, problems)
        per.sum().backward()
        adam.step()
    assert (per.detach() > 1e3 * trace[-1]).all()


def test_a_group_whose_loss_rose_goes_back_half_way_to_its_last_better_point():
    """... and after ``restart`` rises in a row it steps from that point along its negative gradient."""
    problems, points = _quadratics(1, seed=2), []
    (a, c), = problems
    trace, _, _ = _run(problems, 40, points, lr=0.5, max_move=50.0, restart=2)
    best, rose, streak, restarts = 0, 0, 0, 0
    for k in range(1, len(trace) - 1):
        if trace[k, 0] > trace[best, 0]:
            rose, streak = rose + 1, streak + 1
            if streak == 2:                  # restart: the scaled negative gradient at the last better point
                g = a @ (points[best][0] - c)
                assert torch.allclose(points[k + 1][0], points[best][0] - 0.5 * g / g.abs().max(), atol=1e-6)
                streak, restarts = 0, restarts + 1
            else:                            # half-way back to the last better point
                assert torch.allclose(points[k + 1], 0.5 * (points[best] + points[k]))
        else:
            best, streak = k, 0
    assert rose and restarts, "the uncapped steps overshoot, twice in a row at least once"


def test_the_module_builds_it_and_refuses_what_it_cannot_take(tmp_path):
    from conftest import fit

    from lafn_lightning.editing.sizing import delta_v_copies

    cli = fit(tmp_path, "--model.optimizer", "lbfgs", "--model.lbfgs_history", "3", "--trainer.max_steps", "6",
              "--model.stop_loss", "0")
    opt, dv = cli.trainer.optimizers[0], cli.model.delta_v
    assert isinstance(opt, GroupLBFGS) and dv.detach().abs().amax() > 0
    state = opt.state[dv]
    assert len(state["S"]) == len(state["Y"]) == 3          # the history is capped, ...
    kept = sum(t.numel() for v in state.values() for t in (v if isinstance(v, list) else [v]) if t.numel() == dv.numel())
    assert kept == (delta_v_copies({"optimizer": "lbfgs", "lbfgs_history": 3}) - 3) * dv.numel()   # ... and the memory plan counts what it keeps
    from lafn_lightning.cache import CacheError, EditCache

    settings = EditCache.open(tmp_path / "cache").settings
    assert (settings["optimizer"], settings["lbfgs_history"]) == ("lbfgs", 3)   # the cache records how its ΔV were trained
    with pytest.raises(CacheError, match=r"other settings \(optimizer: cache has 'lbfgs', given None; lbfgs_history"):
        fit(tmp_path, "--trainer.max_steps", "6", "--model.stop_loss", "0")    # Adam's edits are not added to it
    for extra in (("--model.lr_schedule", "cosine"), ("--model.drop_converged", "true"), ("--model.lbfgs_history", "0")):
        with pytest.raises(ValueError, match="model.(optimizer|lbfgs_history)="):
            fit(tmp_path / "refused", "--model.optimizer", "lbfgs", *extra, "--trainer.fast_dev_run", "true")
    with pytest.raises(ValueError, match="model.optimizer="):
        fit(tmp_path / "refused", "--model.optimizer", "sgd", "--trainer.fast_dev_run", "true")
