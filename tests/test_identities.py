"""Identities between optimizers that hold exactly in real arithmetic.

* LAMB with ``layer_adaptation=False`` (trust ratio 1) is AdamW with the same eps (outside the square root,
  with bias correction -- LAMB's defaults):
  w - lr*(m_hat/(sqrt(v_hat)+eps) + wd*w) = w*(1 - lr*wd) - lr*m_hat/(sqrt(v_hat)+eps).
* LARS with ``layer_adaptation=False`` (trust ratio 1) is torch.optim.SGD with momentum, dampening 0 and L2
  weight decay, for a constant lr: LARS keeps m = lr*buf where torch keeps buf = mu*buf + (g + wd*w), so
  m = mu*m + lr*(g + wd*w) and w - m = w - lr*buf (nesterov: w - mu*m - lr*(g+wd*w) = w - lr*(g+wd*w + mu*buf)).
"""

import pytest
import torch
from conftest import ODD_SHAPES, TOL, assert_close_rel, clone_params, make_grads, make_params, run_steps

import optgen

STEPS = 10


def _groups(params, via_group, **options):
    """The parameters, with ``options`` given either as constructor keywords or in the param group."""
    if via_group:
        return [dict(params=params, **options)], {}
    return params, options


@pytest.mark.parametrize("via_group", [False, True], ids=["kwarg", "param_group"])
def test_lamb_without_layer_adaptation_is_adamw(via_group, backend):
    hypers = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    params = make_params()
    adamw_params = clone_params(params)
    ours_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, STEPS)

    groups, options = _groups(params, via_group, layer_adaptation=False)
    lamb = optgen.LAMB(groups, backend=backend, **options, **hypers)
    assert lamb.param_groups[0]["layer_adaptation"] is False
    run_steps(lamb, params, grads)

    run_steps(torch.optim.AdamW(adamw_params, foreach=False, **hypers), adamw_params, grads)
    run_steps(optgen.AdamW(ours_params, backend=backend, **hypers), ours_params, grads)
    for i, (p, a, o) in enumerate(zip(params, adamw_params, ours_params)):
        assert_close_rel(p, a, torch.float32, what=f"LAMB vs torch AdamW, param {i}")
        assert_close_rel(p, o, torch.float32, what=f"LAMB vs optgen AdamW, param {i}")


def test_lamb_layer_adaptation_changes_the_result(backend):
    """Control for the identity above: with the trust ratio on, LAMB is not AdamW."""
    hypers = dict(lr=1e-2, eps=1e-6, weight_decay=0.1)
    params = make_params()
    adamw_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, 3)
    run_steps(optgen.LAMB(params, backend=backend, **hypers), params, grads)
    run_steps(torch.optim.AdamW(adamw_params, foreach=False, **hypers), adamw_params, grads)
    assert max(float((p - a).detach().abs().max()) for p, a in zip(params, adamw_params)) > 1e-3


@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("via_group", [False, True], ids=["kwarg", "param_group"])
def test_lars_without_layer_adaptation_is_sgd(via_group, nesterov, backend):
    # lr small enough that no 1-element parameter passes close to 0 (where a per-tensor relative error of
    # the few-ulp rounding differences between the two recurrences would be meaningless)
    lr, momentum, wd = 0.01, 0.9, 0.01
    params = make_params()
    sgd_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, STEPS)

    groups, options = _groups(params, via_group, layer_adaptation=False)
    lars = optgen.LARS(groups, lr=lr, momentum=momentum, weight_decay=wd, trust_coefficient=0.5, eps=1e-3,
                       nesterov=nesterov, backend=backend, **options)
    run_steps(lars, params, grads)
    sgd = torch.optim.SGD(sgd_params, lr=lr, momentum=momentum, dampening=0.0, weight_decay=wd,
                          nesterov=nesterov, foreach=False)
    run_steps(sgd, sgd_params, grads)
    for i, (p, s) in enumerate(zip(params, sgd_params)):
        assert_close_rel(p, s, torch.float32, what=f"param {i}")
        # LARS's buffer holds lr * torch's buffer. The two buffers round differently every step (lr*(g+wd*w)
        # is rounded before the momentum sum on one side only), and a momentum sum of random-sign gradients
        # may cancel to a small value, so its relative error is allowed to be 10x the parameters'.
        assert_close_rel(lars.state[p]["momentum_buffer"], lr * sgd.state[s]["momentum_buffer"].double(),
                         tol=10 * TOL[torch.float32], what=f"momentum_buffer {i}")
