"""LARS: layer-wise adaptive rate scaling, in the form of You, Gitman & Ginsburg (2017), arXiv:1708.03888."""

import math

from ..spec import Hyper, Spec, clip, norm, trust_ratio, where

DOC = r"""LARS (You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017), per layer :math:`l`:

.. math::
   \begin{aligned}
   r_t^l &= \frac{c \, \|w_{t-1}^l\|}{\|g_t^l\| + \lambda \|w_{t-1}^l\| + \epsilon}
          \quad (1 \text{ where } \|w\| = 0 \text{ or } \|g\| = 0 \text{, or adaptation is off}) \\
   m_t^l &= \mu m_{t-1}^l + \gamma \, r_t^l (g_t^l + \lambda w_{t-1}^l) \\
   w_t^l &= w_{t-1}^l - m_t^l \quad (\text{nesterov: } w_{t-1}^l - \mu m_t^l - \gamma r_t^l (g_t^l + \lambda w_{t-1}^l))
   \end{aligned}

with trust coefficient :math:`c` (the slide's :math:`\phi(z) = c \min(\max(z, lo), hi)`, ``trust_clip=(lo, hi)``,
no clip by default), learning rate :math:`\gamma`, momentum
:math:`\mu`, weight decay :math:`\lambda`.
"""


CLIP_DOC = "(lo, hi): phi clips ||w|| into [lo, hi] (lo finite)"


def lars() -> Spec:
    spec = Spec("LARS", doc=DOC)
    lr, momentum, wd, coeff, eps, lo, hi = spec.hyper(
        lr=1e-3,
        momentum=0.9,
        weight_decay=0.0,
        trust_coefficient=1e-3,
        eps=0.0,
        trust_clip=Hyper((Hyper(0.0, doc=CLIP_DOC), Hyper(math.inf, finite=False, doc=CLIP_DOC)), doc=CLIP_DOC),
    )
    nesterov = spec.flag(nesterov=False)
    spec.require(lo <= hi, "trust_clip=(lo, hi) needs lo <= hi")
    w, g = spec.param, spec.grad
    m = spec.state("momentum_buffer")
    w_norm, g_norm = norm(w), norm(g)
    # phi(||w||) = c * clip(||w||, lo, hi): the slide's scaling function; (0, inf) is no clip
    ratio = trust_ratio(coeff * clip(w_norm, lo, hi), g_norm + wd * w_norm + eps, g_norm, w_norm)
    scaled = lr * ratio * (g + wd * w)
    m1 = spec.update(m, momentum * m + scaled)
    spec.update(w, w - where(nesterov, momentum * m1 + scaled, m1))
    return spec
