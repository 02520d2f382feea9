"""Adam (L2 weight decay) and AdamW (decoupled weight decay), with the results of torch.optim."""

from ..spec import Hyper, Max, Spec, sqrt, where

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

AMSGRAD_DOC = r"""

With ``amsgrad=True`` (Reddi et al., 2018) the denominator uses the running maximum of the second moment,
:math:`\hat v_t = \max(\hat v_{t-1}, v_t)` (state ``max_exp_avg_sq``), in place of :math:`v_t`.
"""


def _adam(name: str, doc: str, decoupled: bool, weight_decay: float) -> Spec:
    """torch >= 2.6 writes both as one algorithm: AdamW is Adam with ``decoupled_weight_decay=True``, and each
    param group keeps the flag (an Adam loading an AdamW checkpoint steps as AdamW)."""
    spec = Spec(name, doc=doc + AMSGRAD_DOC)
    spec.torch_foreach_refuses_tensors = True
    lr, beta1, beta2, eps, wd = spec.hyper(lr=1e-3, betas=BETAS, eps=1e-8, weight_decay=weight_decay)
    amsgrad, decoupled_wd = spec.flag(amsgrad=False, decoupled_weight_decay=decoupled)
    w, g, t = spec.param, spec.grad, spec.step
    m, v, v_max = spec.state("exp_avg"), spec.state("exp_avg_sq", quantize="unsigned"), spec.state("max_exp_avg_sq", quantize="unsigned")
    g = where(decoupled_wd, g, g + wd * w)
    m1 = spec.update(m, beta1 * m + (1 - beta1) * g)
    v1 = spec.update(v, beta2 * v + (1 - beta2) * g**2)
    v_max1 = spec.update(v_max, where(amsgrad, Max(v_max, v1), v_max))
    step = (lr / (1 - beta1**t)) * m1 / (sqrt(where(amsgrad, v_max1, v1)) / sqrt(1 - beta2**t) + eps)
    spec.update(w, where(decoupled_wd, w * (1 - lr * wd), w) - step)
    return spec


def adam() -> Spec:
    return _adam("Adam", ADAM_DOC, decoupled=False, weight_decay=0.0)


def adamw() -> Spec:
    spec = _adam("AdamW", ADAMW_DOC, decoupled=True, weight_decay=1e-2)
    # torch.optim.AdamW loads any state dict (an Adam one too) as AdamW
    spec.torch_forced_on_load = {"decoupled_weight_decay": True}
    return spec


EIGHT_BIT_DOC = r"""

Its states are kept in blockwise 8 bits by default (``state_format="8bit"``; ``optgen.quantization``): per block
of 256 elements one fp32 scale :math:`s_b = \max_{i \in b} |x_i|` and per element the code of the nearest
value of a dynamic map (signed for :math:`m`, unsigned for :math:`v`); each step dequantizes them, computes in
fp32 and quantizes the new values (the update uses them before rounding, as bitsandbytes and torchao do).
Tensors under 4096 elements keep fp32 state; ``state_format="fp32"`` keeps all of it in fp32.
"""


def adamw8bit() -> Spec:
    """AdamW with 8-bit states (torchao's ``AdamW8bit``, bitsandbytes' ``AdamW8bit``)."""
    spec = _adam("AdamW8bit", ADAMW_DOC + EIGHT_BIT_DOC, decoupled=True, weight_decay=1e-2)
    spec.torch_forced_on_load = {"decoupled_weight_decay": True}
    spec.state_format = "8bit"
    return spec
