"""Linear(LayerNorm(x)): one fused op where the normalised tensor is consumed by one projection only
(e.g. the pair bias of AF2 Suppl. Alg. 7 line 3, LayerNorm(z) -> Linear(c_z -> H)), so the
normalised ``[*, L, L, c_z]`` tensor never needs to be written to memory."""
from __future__ import annotations

from torch import Tensor

from foldforge.kernels import _dispatch
from foldforge.kernels._utils import linear
from foldforge.kernels.layer_norm import layer_norm_reference


def ln_linear_reference(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor,
                        bias: Tensor | None, *, eps: float = 1e-5) -> Tensor:
    """``[*, C_in] -> [*, C_out]``: fp32-statistics LayerNorm, then a linear layer in x's dtype."""
    return linear(layer_norm_reference(x, ln_weight, ln_bias, eps), weight, bias)


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether the Triton kernel handles these inputs. False until the kernel lands."""
    return False


def ln_linear(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor,
              bias: Tensor | None, *, eps: float = 1e-5, impl: str = "reference") -> Tensor:
    """Linear(LayerNorm(x)); see :func:`ln_linear_reference`."""
    _dispatch.resolve("ln_linear", impl, lambda: supports(x, weight))
    return ln_linear_reference(x, ln_weight, ln_bias, weight, bias, eps=eps)
