"""Kernel library: one op per module, each with a readable ``<op>_reference`` (the eager baseline in
every ablation), a ``supports()`` capability check for the Triton path, and a public function taking
``impl="reference" | "auto" | "triton"``. Imports torch only (Triton kernels load lazily)."""
from foldforge.kernels._dispatch import IMPLS, validate_impl
from foldforge.kernels.attention import evo_attention, evo_attention_reference
from foldforge.kernels.dropout import bias_dropout_residual
from foldforge.kernels.gated_output import gated_output, gated_output_reference
from foldforge.kernels.global_attention import global_attention, global_attention_reference
from foldforge.kernels.layer_norm import layer_norm, layer_norm_reference
from foldforge.kernels.ln_linear import ln_linear, ln_linear_reference
from foldforge.kernels.outer_product_mean import OPMParams, outer_product_mean, outer_product_mean_reference
from foldforge.kernels.transition import TransitionParams, transition, transition_reference
from foldforge.kernels.triangle_mult import (TriMulParams, triangle_multiplication,
                                             triangle_multiplication_reference)

__all__ = [
    "IMPLS", "validate_impl",
    "evo_attention", "evo_attention_reference",
    "global_attention", "global_attention_reference",
    "layer_norm", "layer_norm_reference",
    "ln_linear", "ln_linear_reference",
    "gated_output", "gated_output_reference",
    "transition", "transition_reference", "TransitionParams",
    "triangle_multiplication", "triangle_multiplication_reference", "TriMulParams",
    "outer_product_mean", "outer_product_mean_reference", "OPMParams",
    "bias_dropout_residual",
]
