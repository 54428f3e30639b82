"""Linear and LayerNorm with the AF2 initialisers (AF2 Suppl. 1.11.4), and a helper that hands a
module's weights to a kernel function as its ``*Params`` NamedTuple.

Parameter names and shapes follow OpenFold (``openfold/model/primitives.py``): ``weight`` ``[out, in]``
and ``bias`` ``[out]``, so checkpoints map one to one and parameter counts match the MLPerf model.
"""
from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor, nn

from foldforge import kernels as ops

# std of a standard normal truncated to [-2, 2]; dividing by it restores the requested std
_TRUNC_STD = 0.87962566103423978
INITS = ("default", "relu", "glorot", "gating", "normal", "final")


def trunc_normal_fan_in_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """Truncated normal (at 2 std) with variance ``scale / fan_in``: LeCun (1.0) or He (2.0) init."""
    fan_in = weight.shape[-1]
    std = math.sqrt(scale / max(1, fan_in)) / _TRUNC_STD
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class Linear(nn.Linear):
    """``nn.Linear`` with the AF2 initialisers (AF2 Suppl. 1.11.4):

    - "default": LeCun normal (truncated, fan-in);   - "relu": He normal, for layers before a ReLU;
    - "glorot": Glorot uniform (attention q/k/v);    - "normal": N(0, 1/fan_in) (pair-bias projections);
    - "gating": weight 0, bias 1 (sigmoid gates start half open); - "final": weight 0, bias 0 (output layers).
    Biases start at 0 except for "gating".
    """

    def __init__(self, c_in: int, c_out: int, bias: bool = True, init: str = "default", *,
                 device=None, dtype=None):
        if init not in INITS:
            raise ValueError(f"unknown Linear init {init!r}; expected one of {INITS}")
        self.init = init   # set before nn.Linear.__init__, which calls reset_parameters()
        super().__init__(c_in, c_out, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "default":
                trunc_normal_fan_in_(self.weight, 1.0)
            elif self.init == "relu":
                trunc_normal_fan_in_(self.weight, 2.0)
            elif self.init == "glorot":
                nn.init.xavier_uniform_(self.weight, gain=1.0)
            elif self.init == "normal":
                nn.init.normal_(self.weight, mean=0.0, std=1.0 / math.sqrt(max(1, self.in_features)))
            else:   # "gating", "final"
                self.weight.zero_()
            if self.bias is not None:
                self.bias.fill_(1.0 if self.init == "gating" else 0.0)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with a learned scale and offset; calls :func:`kernels.layer_norm`
    (fp32 statistics, output in the input's dtype)."""

    def __init__(self, c: int, eps: float = 1e-5, impl: str = "reference", *, device=None, dtype=None):
        super().__init__()
        self.c = c
        self.eps = eps
        self.impl = ops.validate_impl(impl)
        self.weight = nn.Parameter(torch.ones(c, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(c, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{self.c}, eps={self.eps}, impl={self.impl!r}"


P = TypeVar("P")   # a kernel *Params NamedTuple class


def gather_params(module: nn.Module, params_cls: type[P]) -> P:
    """Fill a kernel's ``*Params`` NamedTuple from ``module``: field ``linear_a_p_weight`` is
    ``module.linear_a_p.weight``. The field names are the naming contract between modules and kernels."""
    values = []
    for name in params_cls._fields:   # type: ignore[attr-defined]
        child, attr = name.rsplit("_", 1)
        values.append(getattr(getattr(module, child), attr))
    return params_cls(*values)


def bool_mask(mask: Tensor | None) -> Tensor | None:
    """AF2 batch masks are 0/1 floats; the attention kernels take bool (True = attend)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > 0.5
