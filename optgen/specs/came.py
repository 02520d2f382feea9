"""CAME: confidence-guided adaptive memory-efficient optimization (Luo et al., ACL 2023), as came-pytorch."""

from ..spec import Max, Spec, Unevaluated, col_mean, layer_numel, row_mean, sqrt, sumsq, where

DOC = r"""CAME (Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", ACL 2023), as the
reference implementation (``came_pytorch.CAME``) computes it.

Adafactor's factored second moment, then a factored *confidence*: the running mean of the squared distance
between the update and its momentum, over rows and columns, scales the momentum. For a matrix (vectors keep
full moments and take the momentum itself):

.. math::
   \begin{aligned}
   r_t &= \beta_2 r_{t-1} + (1 - \beta_2)\,\mathrm{mean}_j(g_t^2 + \epsilon_1), \qquad
   c_t = \beta_2 c_{t-1} + (1 - \beta_2)\,\mathrm{mean}_i(g_t^2 + \epsilon_1) \\
   u_t &= \frac{g_t}{\sqrt{r_t / \mathrm{mean}_i(r_t)}\,\sqrt{c_t}}, \qquad
   \hat u_t = u_t / \max(1, \mathrm{RMS}(u_t) / d) \\
   m_t &= \beta_1 m_{t-1} + (1 - \beta_1) \hat u_t, \qquad U_t = (\hat u_t - m_t)^2 + \epsilon_2 \\
   R_t &= \beta_3 R_{t-1} + (1 - \beta_3)\,\mathrm{mean}_j(U_t), \qquad
   C_t = \beta_3 C_{t-1} + (1 - \beta_3)\,\mathrm{mean}_i(U_t) \\
   \theta_t &= \theta_{t-1} (1 - \gamma\lambda) - \gamma \frac{m_t}{\sqrt{R_t / \mathrm{mean}_i(R_t)}\,\sqrt{C_t}}
   \end{aligned}

with :math:`d` the ``clip_threshold``. The states are came-pytorch's, in its shapes: ``exp_avg``,
``exp_avg_sq_row``/``exp_avg_sq_col`` and ``exp_avg_res_row``/``exp_avg_res_col`` (the parameter's shape without
its last / second-to-last dimension) for matrices, ``exp_avg_sq`` for vectors. came-pytorch has no default
learning rate; here it is 2e-4.
"""


def came() -> Spec:
    spec = Spec("CAME", doc=DOC)
    lr, eps1, eps2, clip_threshold, beta1, beta2, beta3, wd = spec.hyper(
        lr=2e-4, eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999), weight_decay=0.0
    )
    w, g = spec.param, spec.grad
    factored = spec.shape_flag("factored", min_ndim=2)
    m = spec.state("exp_avg")
    sq_row = spec.state("exp_avg_sq_row", per="row", when=factored, keepdim=False)
    sq_col = spec.state("exp_avg_sq_col", per="column", when=factored, keepdim=False)
    res_row = spec.state("exp_avg_res_row", per="row", when=factored, keepdim=False)
    res_col = spec.state("exp_avg_res_col", per="column", when=factored, keepdim=False)
    sq = spec.state("exp_avg_sq", when=~factored, quantize="unsigned")
    squared = g**2 + eps1
    sq_row1 = spec.update(sq_row, beta2 * sq_row + (1 - beta2) * row_mean(squared))
    sq_col1 = spec.update(sq_col, beta2 * sq_col + (1 - beta2) * col_mean(squared))
    sq1 = spec.update(sq, beta2 * sq + (1 - beta2) * squared)
    # Unevaluated: sympy would square g/(sqrt(r/mean)*sqrt(c)) into g**2*mean/(r*c), whose r*c underflows to 0 in
    # fp32 for a zero or tiny gradient (r, c ~ eps1 = 1e-30): 0/0. The reference computes rsqrt factors, then g times them.
    u = Unevaluated(where(factored, g / (sqrt(sq_row1 / col_mean(sq_row1)) * sqrt(sq_col1)), g / sqrt(sq1)))
    u = Unevaluated(u / Max(sqrt(sumsq(u) / layer_numel()) / clip_threshold, 1))
    m1 = spec.update(m, beta1 * m + (1 - beta1) * u)
    res = (u - m1) ** 2 + eps2
    res_row1 = spec.update(res_row, beta3 * res_row + (1 - beta3) * row_mean(res))
    res_col1 = spec.update(res_col, beta3 * res_col + (1 - beta3) * col_mean(res))
    step = where(factored, m1 / (sqrt(res_row1 / col_mean(res_row1)) * sqrt(res_col1)), m1)
    spec.update(w, w - wd * lr * w - lr * step)
    return spec
