"""LayerNorm over the last dim with fp32 statistics (used before nearly every AF2/AF3 projection)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from foldforge.kernels import _dispatch
from foldforge.kernels._utils import acc_dtype


def layer_norm_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """``[*, C] -> [*, C]``: statistics and affine in fp32 (fp64 stays fp64), output in x's dtype.

    bf16 statistics would lose ~3 significant digits on the variance of c_z = 128 channels; every
    AF2 implementation keeps LayerNorm in fp32 under mixed precision.
    """
    acc = acc_dtype(x.dtype)
    y = F.layer_norm(x.to(acc), x.shape[-1:],
                     None if weight is None else weight.to(acc),
                     None if bias is None else bias.to(acc), eps)
    return y.to(x.dtype)


def supports(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether the Triton kernel handles these inputs. False until the kernel lands."""
    return False


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, *,
               impl: str = "reference") -> Tensor:
    """LayerNorm (AF2 Suppl. 1.11.x "LayerNorm"); see :func:`layer_norm_reference`."""
    _dispatch.resolve("layer_norm", impl, lambda: supports(x, weight, bias))
    return layer_norm_reference(x, weight, bias, eps)
