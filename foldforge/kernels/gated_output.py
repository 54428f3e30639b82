"""Gated output projection of AF2 attention: Linear(sigmoid(g) * o) (AF2 Suppl. Alg. 7 lines 4 and 7)."""
from __future__ import annotations

import torch
from torch import Tensor

from foldforge.kernels import _dispatch
from foldforge.kernels._utils import linear


def gated_output_reference(o: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``o`` and ``g`` broadcast to ``[*, C_hidden]`` (gate logits before the sigmoid);
    returns ``[*, C_out]``. In global attention (Alg. 19) ``o`` is ``[*, 1, C_hidden]`` against a
    per-sequence gate ``[*, S, C_hidden]``."""
    return linear(torch.sigmoid(g) * o, weight, bias)


def supports(o: Tensor, g: Tensor, weight: Tensor) -> bool:
    """Whether the Triton kernel handles these inputs. False until the kernel lands."""
    return False


def gated_output(o: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None, *,
                 impl: str = "reference") -> Tensor:
    """Linear(sigmoid(g) * o); see :func:`gated_output_reference`."""
    _dispatch.resolve("gated_output", impl, lambda: supports(o, g, weight))
    return gated_output_reference(o, g, weight, bias)
