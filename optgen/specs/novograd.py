"""NovoGrad: a per-layer second moment (Ginsburg et al., 2019)."""

import sympy

from ..spec import Hyper, Spec, sqrt, sumsq, where

DOC = r"""NovoGrad (Ginsburg et al., 2019): a second moment per layer, the norm of the layer's gradient.

Algorithm 1 of "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep Networks";
the second moment is one number per layer :math:`l`:

.. math::
   \begin{aligned}
   v_t^l &= \begin{cases} \|g_t^l\|^2 & t = 1 \\ \beta_2 v_{t-1}^l + (1 - \beta_2) \|g_t^l\|^2 & t > 1 \end{cases} \\
   u_t^l &= \frac{g_t^l}{\sqrt{v_t^l} + \epsilon} + \lambda w_{t-1}^l \\
   m_t^l &= \begin{cases} u_t^l & t = 1 \\ \beta_1 m_{t-1}^l + u_t^l
           \quad (\text{grad\_averaging: } (1 - \beta_1) u_t^l) & t > 1 \end{cases} \\
   w_t^l &= w_{t-1}^l - \gamma m_t^l
   \end{aligned}

The results of ``pytorch_optimizer.NovoGrad`` (``weight_decouple=False``) and, without grad averaging, of
``torch_optimizer.NovoGrad`` (NVIDIA's Jasper code). The layer value :math:`v^l` is the per-layer state
``exp_avg_sq`` (one fp64 number, as torch_optimizer's 0-d tensor): 4 bytes of state per parameter, 24 bytes of
traffic per step (fp32).
"""

BETAS = Hyper((0.95, 0.98), lo=0.0, hi=1.0, hi_open=True)


def novograd() -> Spec:
    spec = Spec("NovoGrad", doc=DOC)
    lr, beta1, beta2, eps, wd = spec.hyper(lr=1e-3, betas=BETAS, eps=1e-8, weight_decay=0.0)
    grad_averaging = spec.flag(grad_averaging=False)
    w, g, t = spec.param, spec.grad, spec.step
    m, v = spec.state("exp_avg"), spec.state("exp_avg_sq", per="layer")
    first = sympy.Eq(t, 1)
    g2 = sumsq(g)  # ||g||^2 of the layer
    v1 = spec.update(v, where(first, g2, beta2 * v + (1 - beta2) * g2))
    u = g / (sqrt(v1) + eps) + wd * w
    m1 = spec.update(m, where(first, u, beta1 * m + where(grad_averaging, (1 - beta1) * u, u)))
    spec.update(w, w - lr * m1)
    return spec
