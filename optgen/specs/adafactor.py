"""Adafactor with factored second moments, as torch.optim.Adafactor (Shazeer & Stern, 2018)."""

import math

from ..spec import Hyper, Max, Min, Spec, col_mean, layer_numel, row_mean, sqrt, sumsq, where

DOC = r"""Adafactor (Shazeer & Stern, 2018), as ``torch.optim.Adafactor`` computes it.

For a parameter of 2+ dimensions (matrices, batched over the leading dimensions) the second moment is factored:
a running mean of :math:`g^2` over each row, :math:`R_t`, and over each column, :math:`C_t`; a vector keeps the
full :math:`V_t`. With :math:`\hat\beta_{2t} = 1 - t^{c}` (``beta2_decay`` :math:`c = -0.8`):

.. math::
   \begin{aligned}
   \rho_t &= \min(\gamma, 1/\sqrt{t}), \qquad \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t \\
   \theta_t &\leftarrow \theta_{t-1} (1 - \gamma\lambda) \\
   R_t &= R_{t-1} + t^{c} \big(\mathrm{mean}_{j}(g_t^2) - R_{t-1}\big), \qquad
   C_t = C_{t-1} + t^{c} \big(\mathrm{mean}_{i}(g_t^2) - C_{t-1}\big) \\
   \hat V_t &= \frac{R_t C_t}{\max(\mathrm{mean}_i(R_t), \epsilon_1)} \quad (\text{a vector: }
   V_t = V_{t-1} + t^{c}(g_t^2 - V_{t-1})) \\
   U_t &= \frac{g_t}{\sqrt{\max(\hat V_t, \epsilon_1^2)}}, \qquad
   \theta_t \leftarrow \theta_t - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t)/d)} U_t
   \end{aligned}

The states are torch's: ``row_var`` (the parameter's shape with its last dimension 1) and ``col_var`` (its
second-to-last dimension 1) for matrices, ``variance`` for vectors; 4(R+C)/(RC) bytes per parameter for a
matrix of R x C. ``eps=(None, 1e-3)``: None stands for the fp32 machine epsilon (torch takes the parameter
dtype's; the same for fp32 parameters; optgen computes in fp32 for every storage dtype).
"""

FP32_EPS = 1.1920928955078125e-07


def adafactor() -> Spec:
    spec = Spec("Adafactor", doc=DOC)
    lr, beta2_decay, eps1, eps2, d, wd = spec.hyper(
        lr=1e-2,
        beta2_decay=Hyper(-0.8, lo=-math.inf, hi=0.0),
        eps=(Hyper(None, none=FP32_EPS), 1e-3),
        d=Hyper(1.0, lo=1.0),  # torch: "Clipping threshold d should be >= 1"
        weight_decay=0.0,
    )
    w, g, t = spec.param, spec.grad, spec.step
    factored = spec.shape_flag("factored", min_ndim=2)
    row_var = spec.state("row_var", per="row", when=factored)
    col_var = spec.state("col_var", per="column", when=factored)
    variance = spec.state("variance", when=~factored, quantize="unsigned")
    weight = t**beta2_decay  # 1 - beta2_t
    row_var1 = spec.update(row_var, row_var + weight * (row_mean(g**2) - row_var))
    col_var1 = spec.update(col_var, col_var + weight * (col_mean(g**2) - col_var))
    variance1 = spec.update(variance, variance + weight * (g**2 - variance))
    estimate = where(factored, row_var1 * col_var1 / Max(col_mean(row_var1), eps1), variance1)
    update = g / sqrt(Max(estimate, eps1**2))
    alpha = Max(eps2, sqrt(sumsq(w) / layer_numel())) * Min(lr, 1 / sqrt(t))
    denominator = Max(1, sqrt(sumsq(update) / layer_numel()) / d)
    spec.update(w, w * (1 - lr * wd) - alpha / denominator * update)
    return spec
