"""Adam (L2 weight decay) and AdamW (decoupled weight decay), with the results of torch.optim."""

from ..spec import Hyper, Spec, sqrt

ADAM_DOC = r"""Adam (Kingma & Ba, 2015) with L2 weight decay, with the results of ``torch.optim.Adam``.

.. math::
   \begin{aligned}
   g' &= g_t + \lambda w_{t-1} \\
   m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g' \\
   v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g'^2 \\
   w_t &= w_{t-1} - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
   \end{aligned}
"""

ADAMW_DOC = r"""AdamW (Loshchilov & Hutter, 2019), with the results of ``torch.optim.AdamW``.

.. math::
   \begin{aligned}
   m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
   v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
   w_t &= w_{t-1} (1 - \gamma \lambda)
          - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
   \end{aligned}
"""

BETAS = Hyper((0.9, 0.999), lo=0.0, hi=1.0, hi_open=True)


def _adam(name: str, doc: str, decoupled: bool, weight_decay: float) -> Spec:
    spec = Spec(name, doc=doc)
    lr, beta1, beta2, eps, wd = spec.hyper(lr=1e-3, betas=BETAS, eps=1e-8, weight_decay=weight_decay)
    w, g, t = spec.param, spec.grad, spec.step
    m, v = spec.state("exp_avg"), spec.state("exp_avg_sq")
    if not decoupled:
        g = g + wd * w
    m1 = spec.update(m, beta1 * m + (1 - beta1) * g)
    v1 = spec.update(v, beta2 * v + (1 - beta2) * g**2)
    step = (lr / (1 - beta1**t)) * m1 / (sqrt(v1) / sqrt(1 - beta2**t) + eps)
    spec.update(w, (w * (1 - lr * wd) if decoupled else w) - step)
    return spec


def adam() -> Spec:
    return _adam("Adam", ADAM_DOC, decoupled=False, weight_decay=0.0)


def adamw() -> Spec:
    return _adam("AdamW", ADAMW_DOC, decoupled=True, weight_decay=1e-2)
