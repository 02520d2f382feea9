"""LAMB and NVLAMB: layer-wise adaptive moments, as in the LAMB paper (You et al., ICLR 2020, arXiv:1904.00962) and NVIDIA's BERT recipe."""

import math

from ..spec import Hyper, Max, Spec, Unevaluated, clip, global_norm, norm, sqrt, trust_ratio, where

LAMB_DOC = r"""LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020), per layer :math:`l`:

.. math::
   \begin{aligned}
   m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
   \hat m_t &= m_t / (1 - \beta_1^t), \qquad \hat v_t = v_t / (1 - \beta_2^t)
       \quad (\text{bias\_correction}; \text{ else } \hat m = m, \hat v = v) \\
   u_t &= \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda w_{t-1}
       \quad (\text{eps\_inside\_sqrt: } \hat m_t / \sqrt{\hat v_t + \epsilon}, \text{ the slide's form}) \\
   r_t &= \phi(\|w_{t-1}\|) / \|u_t\| \quad (1 \text{ where either norm is } 0 \text{ or adaptation is off}) \\
   w_t &= w_{t-1} - \gamma \, r_t \, u_t
   \end{aligned}

:math:`\phi(z) = \min(\max(z, lo), hi)` with ``trust_clip=(lo, hi)`` (default: no clip), as the slide's
scaling function; several PyTorch ports clip at 10.
"""

NVLAMB_DOC = r"""NVLAMB (NVIDIA's BERT recipe; apex ``FusedLAMB(use_nvlamb=True)``): LAMB after global gradient
pre-normalisation, with bias correction and the trust ratio on every layer:

.. math::
   \begin{aligned}
   \hat g_t &= g_t / \max\!\left(1, \|g_t\|_{\text{global}} / \text{max\_grad\_norm}\right) \\
   &\text{then LAMB (above) with } \hat g_t \text{ in place of } g_t.
   \end{aligned}

:math:`\|g\|_{\text{global}}` is the L2 norm over all parameters of the optimizer.
"""

BETAS = Hyper((0.9, 0.999), lo=0.0, hi=1.0, hi_open=True)
# phi of the slides: clip ||w|| into [lo, hi] before the ratio; (0, inf) is no clip
# (a finite lower bound; the upper one may be inf), and lo <= hi: a requirement of the spec
_CLIP_DOC = "(lo, hi): phi clips ||w|| into [lo, hi] (lo finite)"
TRUST_CLIP = Hyper((Hyper(0.0, doc=_CLIP_DOC), Hyper(math.inf, finite=False, doc=_CLIP_DOC)), doc=_CLIP_DOC)


def _lamb_body(spec: Spec, g, lr, beta1, beta2, eps, wd, bias_correction, eps_inside_sqrt, phi_lo=0, phi_hi=math.inf):
    w, t = spec.param, spec.step
    # in 8 bits its second moment takes the squared map: the trust ratio would hand a layer's step to elements whose
    # v rounds to 0 under torchao's unsigned map (optgen.quantization)
    m, v = spec.state("exp_avg"), spec.state("exp_avg_sq", quantize="square")
    m1 = spec.update(m, beta1 * m + (1 - beta1) * g)
    v1 = spec.update(v, beta2 * v + (1 - beta2) * g**2)
    m_hat = where(bias_correction, m1 / (1 - beta1**t), m1)
    v_hat = where(bias_correction, v1 / (1 - beta2**t), v1)
    adam_step = m_hat / where(eps_inside_sqrt, sqrt(v_hat + eps), sqrt(v_hat) + eps)
    u = adam_step + wd * w
    w_norm = norm(w)
    phi = w_norm if phi_hi == math.inf and phi_lo == 0 else clip(w_norm, phi_lo, phi_hi)
    spec.update(w, w - lr * trust_ratio(phi, norm(u), w_norm) * u)


def lamb() -> Spec:
    spec = Spec("LAMB", doc=LAMB_DOC)
    lr, beta1, beta2, eps, wd, lo, hi = spec.hyper(
        lr=1e-3, betas=BETAS, eps=1e-6, weight_decay=0.01, trust_clip=TRUST_CLIP
    )
    bias_correction, eps_inside_sqrt = spec.flag(bias_correction=True, eps_inside_sqrt=False)
    spec.require(lo <= hi, "trust_clip=(lo, hi) needs lo <= hi")
    _lamb_body(spec, spec.grad, lr, beta1, beta2, eps, wd, bias_correction, eps_inside_sqrt, lo, hi)
    return spec


def nvlamb() -> Spec:
    spec = Spec("NVLAMB", doc=NVLAMB_DOC)
    lr, beta1, beta2, eps, wd, max_norm = spec.hyper(
        lr=1e-3, betas=BETAS, eps=1e-6, weight_decay=0.01, max_grad_norm=Hyper(1.0, lo=0.0, lo_open=True)
    )
    # Unevaluated: sympy would distribute (g/c)**2 into g**2/c**2, which overflows for large g.
    g = Unevaluated(spec.grad / Max(1, global_norm(spec.grad) / max_norm))
    _lamb_body(spec, g, lr, beta1, beta2, eps, wd, True, False)
    return spec


LAMB8BIT_DOC = r"""

LAMB8bit keeps its moments in blockwise 8 bits by default (``state_format="8bit"``; ``optgen.quantization``;
tensors under 4096 elements keep fp32 state) and applies the real trust ratio, unlike bitsandbytes' 8-bit LAMB
(whose blockwise path skips it): pass 1 updates the moments in fp32, quantizes them, sums
:math:`\|w\|^2` and :math:`\|u\|^2` of the fp32 update :math:`u` and stores :math:`u` itself in 8 bits for
pass 2, which applies :math:`w - \gamma \phi(\|w\|) / \|u\| \cdot u` (pass 2 never re-reads the 8-bit moments:
where a second moment rounds to 0 beside a first moment that does not, :math:`u` would step by
:math:`m / \epsilon`).
"""


def lamb8bit() -> Spec:
    """LAMB with 8-bit states and the real trust ratio."""
    spec = Spec("LAMB8bit", doc=LAMB_DOC + LAMB8BIT_DOC)
    lr, beta1, beta2, eps, wd, lo, hi = spec.hyper(
        lr=1e-3, betas=BETAS, eps=1e-6, weight_decay=0.01, trust_clip=TRUST_CLIP
    )
    bias_correction, eps_inside_sqrt = spec.flag(bias_correction=True, eps_inside_sqrt=False)
    spec.require(lo <= hi, "trust_clip=(lo, hi) needs lo <= hi")
    _lamb_body(spec, spec.grad, lr, beta1, beta2, eps, wd, bias_correction, eps_inside_sqrt, lo, hi)
    spec.state_format = "8bit"
    return spec
