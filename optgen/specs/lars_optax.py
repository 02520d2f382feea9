"""LARS in optax's form: the trust ratio divides by the norm of the decayed gradient."""

from ..spec import Hyper, Spec, norm, trust_ratio, where

DOC = r"""LARS (You, Gitman & Ginsburg, 2017) in optax's form: the ratio divides by ||g + wd*w||.

``optax.lars`` (``add_decayed_weights``, ``scale_by_trust_ratio``, ``scale_by_learning_rate``, ``trace``), per
layer :math:`l`:

.. math::
   \begin{aligned}
   u_t^l &= g_t^l + \lambda w_{t-1}^l \\
   r_t^l &= \frac{c \, \|w_{t-1}^l\|}{\|u_t^l\| + \epsilon}
          \quad (1 \text{ where } \|w\| = 0 \text{ or } \|u\| = 0 \text{, or adaptation is off}) \\
   m_t^l &= \mu m_{t-1}^l + \gamma \, r_t^l u_t^l \\
   w_t^l &= w_{t-1}^l - m_t^l \quad (\text{nesterov: } w_{t-1}^l - \mu m_t^l - \gamma r_t^l u_t^l)
   \end{aligned}

optgen's ``LARS`` (the paper's form) divides by :math:`\|g\| + \lambda \|w\|` instead of :math:`\|g + \lambda w\|`.
``layer_adaptation=False`` is optax's ``trust_ratio_mask``, ``weight_decay=0`` its ``weight_decay_mask``;
the momentum buffer holds optax's ``trace`` with the opposite sign (``momentum_buffer``, as torch's SGD).
"""


def lars_optax() -> Spec:
    spec = Spec("LARSOptax", doc=DOC)
    lr, momentum, wd, coeff, eps = spec.hyper(
        lr=1e-3,
        momentum=0.9,
        weight_decay=0.0,
        trust_coefficient=Hyper(1e-3, lo=0.0, lo_open=True),
        eps=0.0,
    )
    nesterov = spec.flag(nesterov=False)
    w, g = spec.param, spec.grad
    m = spec.state("momentum_buffer")
    u = g + wd * w
    w_norm, u_norm = norm(w), norm(u)
    scaled = lr * trust_ratio(coeff * w_norm, u_norm + eps, w_norm, u_norm) * u
    m1 = spec.update(m, momentum * m + scaled)
    spec.update(w, w - where(nesterov, momentum * m1 + scaled, m1))
    return spec
