"""Stochastic gradient descent with momentum, dampening, L2 weight decay and Nesterov (torch.optim.SGD)."""

import sympy

from ..spec import Spec, where

DOC = r"""Stochastic gradient descent, with the results of ``torch.optim.SGD``.

.. math::
   \begin{aligned}
   g' &= g_t + \lambda w_{t-1} \\
   b_t &= \begin{cases} g' & t = 1 \\ \mu b_{t-1} + (1 - \tau) g' & t > 1 \end{cases} \\
   d &= \begin{cases} g' & \mu = 0 \\ g' + \mu b_t & \text{nesterov} \\ b_t & \text{otherwise} \end{cases} \\
   w_t &= w_{t-1} - \gamma d
   \end{aligned}

with learning rate :math:`\gamma` (``lr``), momentum :math:`\mu`, dampening :math:`\tau` and weight decay
:math:`\lambda`. Source: torch.optim.SGD (Sutskever et al., 2013 for the momentum form).
"""


def sgd() -> Spec:
    spec = Spec("SGD", doc=DOC)
    lr, momentum, dampening, wd = spec.hyper(
        lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0
    )
    nesterov = spec.flag(nesterov=False)
    w, g, t = spec.param, spec.grad, spec.step
    buf = spec.state("momentum_buffer")
    spec.require(
        sympy.Or(sympy.Not(nesterov), sympy.And(momentum > 0, sympy.Eq(dampening, 0))),
        "Nesterov momentum requires a momentum and zero dampening",
    )
    gd = g + wd * w
    buf1 = spec.update(buf, where(sympy.Eq(t, 1), gd, momentum * buf + (1 - dampening) * gd))
    direction = where(nesterov, gd + momentum * buf1, buf1)
    spec.update(w, w - lr * where(sympy.Eq(momentum, 0), gd, direction))
    return spec
