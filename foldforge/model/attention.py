"""Gated multi-head attention (AF2 Suppl. Alg. 7 lines 2-7) and global attention (Alg. 19).

Parameter layout as OpenFold's ``Attention`` / ``GlobalAttention``: q/k/v projections without bias
(Glorot init), gate ``linear_g`` with bias ("gating" init), output ``linear_o`` with bias ("final" init).
``c_hidden`` is the per-head width, so the projections are ``c -> num_heads * c_hidden``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from foldforge import kernels as ops
from foldforge.model.primitives import LayerNorm, Linear, bool_mask


class Attention(nn.Module):
    """Multi-head attention with optional shared bias, key mask and sigmoid gating.

    Args:
        c_q, c_kv: input widths of the query and key/value activations.
        c_hidden: width per head; num_heads: number of heads.
        gating: gate the heads with ``sigmoid(linear_g(q_x))`` (AF2 always does).
        impl: implementation of :func:`kernels.evo_attention` (``KernelConfig.attention``).
        gated_output_impl: implementation of :func:`kernels.gated_output` (``KernelConfig.gated_output``).
    """

    def __init__(self, c_q: int, c_kv: int, c_hidden: int, num_heads: int, *, gating: bool = True,
                 impl: str = "reference", gated_output_impl: str = "reference"):
        super().__init__()
        self.c_hidden = c_hidden
        self.num_heads = num_heads
        self.impl = ops.validate_impl(impl)
        self.gated_output_impl = ops.validate_impl(gated_output_impl)
        hd = num_heads * c_hidden
        self.linear_q = Linear(c_q, hd, bias=False, init="glorot")
        self.linear_k = Linear(c_kv, hd, bias=False, init="glorot")
        self.linear_v = Linear(c_kv, hd, bias=False, init="glorot")
        self.linear_o = Linear(hd, c_q, init="final")
        self.linear_g = Linear(c_q, hd, init="gating") if gating else None

    def forward(self, q_x: Tensor, kv_x: Tensor, bias: Tensor | None = None, mask: Tensor | None = None,
                chunk_size: int | None = None) -> Tensor:
        """
        Args:
            q_x: ``[*, S, L_q, c_q]``; kv_x: ``[*, S, L_k, c_kv]``.
            bias: ``[*, 1|S, H, L_q, L_k]`` added to the logits, or None.
            mask: ``[*, S, L_k]`` key mask (bool, or 0/1 float), or None.
            chunk_size: attend ``chunk_size`` of the S rows at a time (inference memory).
        Returns:
            ``[*, S, L_q, c_q]``.
        """
        heads = (self.num_heads, self.c_hidden)
        q = self.linear_q(q_x).unflatten(-1, heads)    # [*, S, L_q, H, D]
        k = self.linear_k(kv_x).unflatten(-1, heads)   # [*, S, L_k, H, D]
        v = self.linear_v(kv_x).unflatten(-1, heads)
        g = None if self.linear_g is None else self.linear_g(q_x)
        return self.attend(q, k, v, g, bias, mask, chunk_size)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, bias: Tensor | None = None,
               mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        """The part after the projections: q, k, v ``[*, S, L, H, D]``, gate logits g ``[*, S, L_q, H * D]``."""
        o = ops.evo_attention(q, k, v, bias, bool_mask(mask), chunk_size=chunk_size, impl=self.impl)
        o = o.flatten(-2)                              # [*, S, L_q, H * D]
        if g is None:
            return self.linear_o(o)
        return ops.gated_output(o, g, self.linear_o.weight, self.linear_o.bias, impl=self.gated_output_impl)

    def forward_layer_norm(self, x: Tensor, layer_norm: LayerNorm, extra: tuple[Linear, ...] = (),
                           mask: Tensor | None = None, chunk_size: int | None = None,
                           bias_from_extra=None) -> Tensor:
        """Self-attention on ``LayerNorm(x)`` (q_x = kv_x).

        With the reference LayerNorm this is ``forward(ln(x), ln(x), ...)`` as written. Otherwise the
        LayerNorm and every projection that reads its output -- q, k, v, g and the bias-free ``extra``
        Linears (e.g. the triangle-attention pair bias) -- run as ONE :func:`kernels.ln_linear` over the
        concatenated weights: the normalised activation is neither written nor saved.
        ``bias_from_extra`` maps the ``extra`` outputs to the attention bias.
        """
        heads = (self.num_heads, self.c_hidden)
        if layer_norm.impl == "reference":
            xn = layer_norm(x)
            extras = [lin(xn) for lin in extra]
            bias = bias_from_extra(*extras) if bias_from_extra is not None else None
            return self.forward(xn, xn, bias=bias, mask=mask, chunk_size=chunk_size)
        lins = [self.linear_q, self.linear_k, self.linear_v] + ([self.linear_g] if self.linear_g is not None else [])
        lins += list(extra)
        weight = torch.cat([lin.weight for lin in lins], dim=0)
        biases = [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in lins]
        y = ops.ln_linear(x, layer_norm.weight, layer_norm.bias, weight, torch.cat(biases), eps=layer_norm.eps,
                          impl=layer_norm.impl)
        parts = list(y.split([lin.out_features for lin in lins], dim=-1))
        q, k, v = (t.unflatten(-1, heads) for t in parts[:3])
        g = parts[3] if self.linear_g is not None else None
        extras = parts[4 if self.linear_g is not None else 3:]
        bias = bias_from_extra(*extras) if bias_from_extra is not None else None
        return self.attend(q, k, v, g, bias, mask, chunk_size)


class GlobalAttention(nn.Module):
    """Global attention of the extra-MSA column step (AF2 Suppl. Alg. 19), on column-major input.

    One query per head from the masked mean over sequences; single-head keys and values shared by all
    heads (``linear_k``/``linear_v``: ``c_in -> c_hidden``); per-sequence gates. The softmax part is
    :func:`kernels.global_attention`; the mask-mean and gating are here.
    """

    def __init__(self, c_in: int, c_hidden: int, num_heads: int, *, impl: str = "reference",
                 gated_output_impl: str = "reference", eps: float = 1e-10):
        super().__init__()
        self.c_hidden = c_hidden
        self.num_heads = num_heads
        self.eps = eps   # of the masked mean (AF2's mask_mean uses 1e-10)
        self.impl = ops.validate_impl(impl)
        self.gated_output_impl = ops.validate_impl(gated_output_impl)
        hd = num_heads * c_hidden
        self.linear_q = Linear(c_in, hd, bias=False, init="glorot")
        self.linear_k = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.linear_v = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.linear_g = Linear(c_in, hd, init="gating")
        self.linear_o = Linear(hd, c_in, init="final")

    def forward(self, m: Tensor, mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        """
        Args:
            m: ``[*, N_res, N_seq, c_in]`` (already layer-normed, residues leading).
            mask: ``[*, N_res, N_seq]`` (bool or 0/1 float), or None.
            chunk_size: residues per chunk of the attention core.
        Returns:
            ``[*, N_res, N_seq, c_in]``.
        """
        if mask is None:
            mask = m.new_ones(m.shape[:-1])
        keep = bool_mask(mask)
        w = keep.to(m.dtype)[..., None]                                      # [*, N_res, N_seq, 1]
        q = (m * w).sum(-2) / (w.sum(-2) + self.eps)                          # [*, N_res, c_in]
        q = self.linear_q(q).unflatten(-1, (self.num_heads, self.c_hidden))   # [*, N_res, H, D]
        k, v = self.linear_k(m), self.linear_v(m)                             # [*, N_res, N_seq, D]
        o = ops.global_attention(q, k, v, keep, chunk_size=chunk_size, impl=self.impl)
        o = o.flatten(-2).unsqueeze(-2)                                       # [*, N_res, 1, H * D]
        return ops.gated_output(o, self.linear_g(m), self.linear_o.weight, self.linear_o.bias,
                                    impl=self.gated_output_impl)
