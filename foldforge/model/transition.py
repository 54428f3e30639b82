"""Transition blocks: AF2 Suppl. Alg. 9 (MSA) / Alg. 15 (pair) with ReLU, AF3 Suppl. Alg. 11 with SwiGLU."""
from __future__ import annotations

from torch import Tensor, nn

from foldforge import kernels as ops
from foldforge.config import KernelConfig
from foldforge.model.primitives import LayerNorm, Linear, gather_params

ACTIVATIONS = ("relu", "swiglu")


class Transition(nn.Module):
    """LayerNorm -> Linear(c -> n c) -> activation -> Linear(n c -> c); returns the update.

    "relu" (AF2): both linears with bias, He init before the ReLU, as OpenFold's ``MSATransition`` /
    ``PairTransition``. "swiglu" (AF3): ``linear_1`` is ``c -> 2 n c`` without bias (first half through
    swish, times the second half), ``linear_2`` without bias.
    """

    def __init__(self, c: int, n: int, kernels: KernelConfig, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.impl = ops.validate_impl(kernels.transition)
        glu = activation == "swiglu"
        # weights only: the kernel applies the LayerNorm inside the fused op
        self.layer_norm = LayerNorm(c)
        self.linear_1 = Linear(c, (2 if glu else 1) * n * c, bias=not glu, init="relu")
        self.linear_2 = Linear(n * c, c, bias=not glu, init="final")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x ``[*, c]``, mask ``[*]`` (0/1 or bool, e.g. the MSA or pair mask) -> update ``[*, c]``,
        zero where masked (as OpenFold)."""
        params = gather_params(self, ops.TransitionParams)
        out = ops.transition(x, params, activation=self.activation, eps=self.layer_norm.eps, impl=self.impl)
        return out if mask is None else out * mask.to(out.dtype)[..., None]

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, impl={self.impl!r}"
