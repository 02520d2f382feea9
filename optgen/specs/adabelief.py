"""AdaBelief: Adam with the variance of the gradient around its moving average (Zhuang et al., 2020)."""

from ..spec import Hyper, Spec, sqrt, where

DOC = r"""AdaBelief (Zhuang et al., 2020): Adam with the variance of g around its moving average.

Algorithm 2 of "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients", with decoupled
weight decay (``weight_decouple=True``, the default) or L2:

.. math::
   \begin{aligned}
   g' &= g_t \quad (\text{weight\_decouple=False: } g_t + \lambda w_{t-1}) \\
   m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g' \\
   s_t &= \beta_2 s_{t-1} + (1 - \beta_2) (g' - m_t)^2 + \epsilon \\
   w_t &= w_{t-1} (1 - \gamma \lambda)
          - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{\sqrt{s_t} / \sqrt{1 - \beta_2^t} + \epsilon}
       \quad (\text{weight\_decouple=False: no } (1 - \gamma\lambda))
   \end{aligned}

The results of ``pytorch_optimizer.AdaBelief`` (``rectify=False``, ``ams_bound=False``, ``fixed_decay=False``)
and of the authors' ``adabelief_pytorch``; the states are ``exp_avg`` and ``exp_avg_var``.
"""

BETAS = Hyper((0.9, 0.999), lo=0.0, hi=1.0, hi_open=True)


def adabelief() -> Spec:
    spec = Spec("AdaBelief", doc=DOC)
    lr, beta1, beta2, eps, wd = spec.hyper(lr=1e-3, betas=BETAS, eps=1e-16, weight_decay=0.0)
    decouple = spec.flag(weight_decouple=True)
    w, t = spec.param, spec.step
    g = where(decouple, spec.grad, spec.grad + wd * w)
    m, s = spec.state("exp_avg"), spec.state("exp_avg_var", quantize="unsigned")
    m1 = spec.update(m, beta1 * m + (1 - beta1) * g)
    s1 = spec.update(s, beta2 * s + (1 - beta2) * (g - m1) ** 2 + eps)
    step = (lr / (1 - beta1**t)) * m1 / (sqrt(s1) / sqrt(1 - beta2**t) + eps)
    spec.update(w, where(decouple, w * (1 - lr * wd), w) - step)
    return spec
