"""language_weighting=loss: each language weighted by its share of the group's current target loss."""
import torch

from conftest import fit


def test_loss_weighting_weights_languages_by_their_detached_loss(tmp_path, dev_data):
    cli = fit(tmp_path, "--data.languages", "null", "--data.groups", "0:2", "--data.dataset", str(dev_data),
              "--model.language_weighting", "loss", "--trainer.fast_dev_run", "true")
    module, batch = cli.model, cli.datamodule.batch
    out = module.losses(batch)
    lt = out["language_target"].detach()
    assert lt.shape == (2, 12) and not torch.isnan(lt).any()
    torch.testing.assert_close(out["objective"].detach(), (lt * lt).sum(1) / lt.sum(1))
    torch.testing.assert_close(out["target"].detach(), lt.mean(1))    # the paper's L_target (equal rows per language)
    assert (out["objective"] > out["target"]).all()                   # lagging languages weigh more
    # the weights are constants: the gradient is that of sum_l w_l L_l with w fixed
    module.delta_v.grad = None
    out["objective"].sum().backward()
    g_weighted = module.delta_v.grad.clone()
    module.delta_v.grad = None
    out = module.losses(batch)
    w = out["language_target"].detach() / out["language_target"].detach().sum(1, keepdim=True)
    (w * out["language_target"]).sum().backward()
    torch.testing.assert_close(g_weighted, module.delta_v.grad)
    assert g_weighted.abs().sum() > 0


def test_with_lbfgs_the_weights_are_differentiated(tmp_path, dev_data):
    """``optimizer: lbfgs`` compares the objective's values step to step: its gradient must be that
    objective's, sum_l L_l^2 / sum_l L_l, weights included (not the fixed-weight one Adam follows)."""
    cli = fit(tmp_path, "--data.languages", "null", "--data.groups", "0:2", "--data.dataset", str(dev_data),
              "--model.language_weighting", "loss", "--model.optimizer", "lbfgs", "--trainer.fast_dev_run", "true")
    module, batch = cli.model, cli.datamodule.batch
    with torch.no_grad():   # away from ΔV = 0, where the KL anchors and some rows give no gradient
        module.delta_v.copy_(0.3 * torch.randn_like(module.delta_v))
    module.delta_v.grad = None
    module.losses(batch)["objective"].sum().backward()
    g_lbfgs = module.delta_v.grad.clone()
    for detach in (False, True):
        module.delta_v.grad = None
        lt = module.losses(batch)["language_target"]
        w = lt.detach() if detach else lt
        ((w * lt).sum(1) / w.sum(1)).sum().backward()
        if detach:
            assert not torch.allclose(g_lbfgs, module.delta_v.grad)
        else:
            torch.testing.assert_close(g_lbfgs, module.delta_v.grad)
