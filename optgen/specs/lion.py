"""Lion: the sign of an interpolated momentum (Chen et al., 2023)."""

from ..spec import Hyper, Spec, sign

DOC = r"""Lion (Chen et al., 2023): the sign of an interpolated momentum, with decoupled weight decay.

Algorithm 2 of "Symbolic Discovery of Optimization Algorithms":

.. math::
   \begin{aligned}
   c_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
   w_t &= w_{t-1} - \gamma \left( \operatorname{sign}(c_t) + \lambda w_{t-1} \right) \\
   m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t
   \end{aligned}

with learning rate :math:`\gamma`, weight decay :math:`\lambda` and :math:`\operatorname{sign}(0) = 0`. The
results of ``pytorch_optimizer.Lion`` (``weight_decouple=True``, ``fixed_decay=False``); the moment is
``exp_avg``. ``optgen.LayerAdaptiveLion`` adds a layer-wise trust ratio to it.
"""

BETAS = Hyper((0.9, 0.99), lo=0.0, hi=1.0, hi_open=True)


def lion() -> Spec:
    spec = Spec("Lion", doc=DOC)
    lr, beta1, beta2, wd = spec.hyper(lr=1e-4, betas=BETAS, weight_decay=0.0)
    w, g = spec.param, spec.grad
    m = spec.state("exp_avg")
    c = beta1 * m + (1 - beta1) * g
    spec.update(m, beta2 * m + (1 - beta2) * g)
    spec.update(w, w * (1 - lr * wd) - lr * sign(c))
    return spec
