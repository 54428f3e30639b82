"""Transition (feed-forward) block: LayerNorm -> Linear(c -> n c) -> activation -> Linear(n c -> c).

"relu": AF2 Suppl. Alg. 9 (MSA) and Alg. 15 (pair). "swiglu": AF3 Suppl. Alg. 11, where the first
projection is ``c -> 2 n c`` (no bias) and ``swish(a) * b`` halves it (``a`` = first half).
"""
from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from foldforge.kernels import _dispatch
from foldforge.kernels._utils import linear
from foldforge.kernels.layer_norm import layer_norm_reference

ACTIVATIONS = ("relu", "swiglu")


class TransitionParams(NamedTuple):
    """Weights in nn.Linear layout ([out, in]); names match the module's parameter names."""
    layer_norm_weight: Tensor
    layer_norm_bias: Tensor | None
    linear_1_weight: Tensor          # [n c, c] (relu) or [2 n c, c] (swiglu)
    linear_1_bias: Tensor | None
    linear_2_weight: Tensor          # [c, n c]
    linear_2_bias: Tensor | None


def transition_reference(x: Tensor, params: TransitionParams, *, activation: str = "relu",
                         eps: float = 1e-5) -> Tensor:
    """``[*, c] -> [*, c]`` update (no residual, no mask)."""
    p = params
    h = linear(layer_norm_reference(x, p.layer_norm_weight, p.layer_norm_bias, eps),
               p.linear_1_weight, p.linear_1_bias)
    if activation == "relu":
        h = F.relu(h)
    elif activation == "swiglu":
        a, b = h.chunk(2, dim=-1)
        h = F.silu(a) * b
    else:
        raise ValueError(f"transition: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return linear(h, p.linear_2_weight, p.linear_2_bias)


def supports(x: Tensor, params: TransitionParams, activation: str) -> bool:
    """Whether the Triton kernel handles these inputs. False until the kernel lands."""
    return False


def transition(x: Tensor, params: TransitionParams, *, activation: str = "relu", eps: float = 1e-5,
               impl: str = "reference") -> Tensor:
    """Transition update (AF2 Suppl. Alg. 9/15, AF3 Suppl. Alg. 11); see :func:`transition_reference`."""
    _dispatch.resolve("transition", impl, lambda: supports(x, params, activation))
    return transition_reference(x, params, activation=activation, eps=eps)
