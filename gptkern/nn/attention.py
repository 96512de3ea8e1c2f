"""MultiheadAttention: torch.nn's module, with the attention served by gptkern.ops."""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from gptkern import ops
from gptkern.ops import _fx
from gptkern.ops._checks import check_bool_arg


def _sdpa_mask(mask: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
    """torch.nn.MultiheadAttention's masks (bool True = do NOT attend, or additive float) as an
    SDPA mask (bool True = attend, or additive float; SDPA checks its dtype, as in torch)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


def _combine(a: Optional[torch.Tensor], b: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Two SDPA masks as one: bool if both are, else their sum, a bool one made additive in
    ``dtype`` (the query's) first, as torch's MultiheadAttention merges them."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b

    def additive(m):
        if m.dtype != torch.bool:
            return m
        zero = torch.zeros((), dtype=dtype, device=m.device)
        return torch.where(m, zero, zero - float("inf"))

    return additive(a) + additive(b)


def _padding_mask_for_causal(kpm: Optional[torch.Tensor], am: Optional[torch.Tensor],
                             dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The key padding mask alone (the causal attn_mask is applied by the kernel), checked and cast
    as torch's merge of the two masks would be: a bool mask counts as ``dtype`` (the query's), and
    SDPA takes the merged mask only in float32 or ``dtype``. Without a padding mask torch drops
    attn_mask unread."""
    masks = [m for m in (kpm, am) if m is not None]
    if kpm is None or all(m.dtype == torch.bool for m in masks):
        return kpm
    merged = functools.reduce(torch.promote_types, [dtype if m.dtype == torch.bool else m.dtype for m in masks])
    if merged not in (torch.float32, dtype):
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                           f"attn_mask.dtype: {merged} and query.dtype: {dtype} instead.")
    return kpm if kpm.dtype == torch.bool else kpm.to(merged)


def _check_fast_path_mask(attn_mask: torch.Tensor, query: torch.Tensor, fused_heads: Optional[int]) -> None:
    """torch's fast path views attn_mask as (1, 1, L, L) (2-D) or (B, -1, L, L) (3-D), and its fused
    kernel (``fused_heads``: the module has input biases) takes a 3-D one only as (B, H, L, L): a
    mask that does not fit is a RuntimeError there, even with the is_causal hint (which the slow
    path honours by dropping the mask unread)."""
    b, l = query.shape[:2]
    # (a view with -1 of an empty tensor is ambiguous: torch raises)
    if attn_mask.dim() == 2:
        fits = attn_mask.numel() == l * l
    else:
        fits = b * l * l > 0 and attn_mask.numel() % (b * l * l) == 0
    if fits and attn_mask.dim() == 3 and fused_heads is not None and attn_mask.numel() != b * fused_heads * l * l:
        raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} is not (B * num_heads, L, L) = "
                           f"({b * fused_heads}, {l}, {l}) (torch's fused fast path reads it even with is_causal=True)")
    if not fits:
        view = (1, 1, l, l) if attn_mask.dim() == 2 else (b, -1, l, l)
        raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} cannot be viewed as {view} (torch's "
                           f"fast path reads it even with is_causal=True)")


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention``: same arguments, forward and ``state_dict``.

    With ``need_weights=False`` the attention runs through ``gptkern.ops.scaled_dot_product_attention``
    (flash attention, no L×S weights). ``need_weights=True`` (torch's default), ``add_bias_kv`` and
    ``add_zero_attn`` take the explicit path, torch's own implementation, which returns the weights.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if torch.jit.is_scripting():  # TorchScript runs torch's attention (gptkern's ops are Python)
            return self._torch_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        node = _fx.leaf_call(self, (query, key, value), dict(  # torch.fx keeps torch.nn's modules as leaves
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal))
        if node is not None:
            return node
        if (need_weights or self.bias_k is not None or self.add_zero_attn or query.dim() not in (2, 3)
                or query.is_nested or (self.training and self.dropout >= 1.0)):  # p = 1: torch's zeros
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and not isinstance(mask, torch.Tensor):
                raise TypeError(f"MultiheadAttention(): argument '{name}' must be a Tensor or None, not "
                                f"{type(mask).__name__}")
        if not isinstance(is_causal, bool):  # torch's fused fast path takes any truthy hint; its others raise
            if not self._torch_fast_path(query, key, value, attn_mask, key_padding_mask):
                check_bool_arg(is_causal, "is_causal", "MultiheadAttention")
            is_causal = bool(is_causal)
        # torch's own shape checks (AssertionError on a mismatch), before anything is reshaped
        F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if is_causal and attn_mask is None:  # (torch's fast path ignores the hint and attends to every key)
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and self._torch_fast_path(query, key, value, attn_mask):
            _check_fast_path_mask(attn_mask, query, self.num_heads if self.in_proj_bias is not None else None)
        if (key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype
                and all(m.dtype == torch.bool or m.is_floating_point() for m in (key_padding_mask, attn_mask))):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.")
        # (on the inputs as given; without biases torch's fast path turns back after merging the masks)
        nan_rows = self.in_proj_bias is not None and self._torch_fast_path(query, key, value, attn_mask,
                                                                            key_padding_mask)
        unbatched = query.dim() == 2
        same = query is key and key is value  # self-attention, one input projection: kept through the reshape
        if unbatched:  # (L, E) -> (1, L, E)
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if same:
            key = value = query
        seq_first = not unbatched and not self.batch_first
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal, nan_rows, seq_first)
        return (out.squeeze(0) if unbatched else out), None

    def _torch_fast_path(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor] = None) -> bool:
        """Whether torch's module would enter its fused fast path (eval-mode batched self-attention
        with nothing requiring grad), which reads attn_mask even with the is_causal hint (without
        biases too: it merges the masks before it finds none and turns back), and gives NaN to a
        query that may attend to no key (its other paths give 0). Not while torch.compile, torch.export
        or make_fx traces, nor for tensors with ``__torch_function__``: torch's turns back there too."""
        params = (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)
        devices = ("cpu", "cuda", torch._C._get_privateuse1_backend_name())
        return (torch.backends.mha.get_fastpath_enabled() and not _tracing()
                and not torch.overrides.has_torch_function((query, *params)) and query.dim() == 3 and query is key
                and all(t is None or t.device.type in devices for t in (query, *params))
                and key is value and not self.training and self.num_heads % 2 == 0 and self.batch_first
                and self._qkv_same_embed_dim and query.dtype == self.in_proj_weight.dtype
                and (self.in_proj_bias is None or query.dtype == self.in_proj_bias.dtype)
                and not (attn_mask is not None and attn_mask.is_floating_point())
                and not (key_padding_mask is not None and key_padding_mask.is_floating_point())
                and not torch.is_autocast_enabled()
                and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                         for t in (query, *params))))

    def _torch_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       key_padding_mask: Optional[torch.Tensor], need_weights: bool,
                       attn_mask: Optional[torch.Tensor], average_attn_weights: bool,
                       is_causal: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """torch.nn.functional's multi-head attention on this module's parameters (scriptable)."""
        batch_first = self.batch_first and query.dim() == 3
        if batch_first:  # (B, seq, E) -> (seq, B, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if batch_first else out), weights

    def _project(self, query, key, value):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.split(e) if self.in_proj_bias is not None else (None,) * 3
        if self._qkv_same_embed_dim and query is key and key is value:  # self-attention: one matmul
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).split(e, dim=-1)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal, nan_rows: bool = False,
                seq_first: bool = False):
        """(B, seq, E) inputs; the output (B, L, E), or with ``seq_first`` (L, B, E), contiguous as
        torch's. nan_rows: a query that may attend to no key gets NaN (torch's fast path), else 0."""
        b, l, e = query.shape
        s = key.shape[1]
        h, dh = self.num_heads, self.head_dim
        # torch's multi_head_attention_forward checks (AssertionError), in the (B, seq, E) layout
        if e != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {e}")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's batch and sequence dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        if key.shape[0] != b:
            raise RuntimeError(f"query has batch size {b} but key and value have {key.shape[0]}")
        if not self._qkv_same_embed_dim:
            for name, t, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
                if t.shape[-1] != dim:
                    raise AssertionError(f"expecting {name} embedding dimension of {dim}, but got {t.shape[-1]}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, s):
            raise AssertionError(f"expecting key_padding_mask shape of {(b, s)}, but got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None and not (is_causal and key_padding_mask is None):  # else torch drops it unread
            expected = (l, s) if attn_mask.dim() == 2 else (b * h, l, s)
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {tuple(attn_mask.shape)}, "
                                   f"but should be {expected}.")
        q, k, v = self._project(query, key, value)
        q, k, v = (t.reshape(b, n, h, dh).transpose(1, 2) for t, n in ((q, l), (k, s), (v, s)))  # (B, H, seq, Dh)
        kpm = _sdpa_mask(key_padding_mask, "key_padding_mask")
        if kpm is not None:
            kpm = kpm.reshape(b, 1, 1, s)
        am = _sdpa_mask(attn_mask, "attn_mask")
        if is_causal:  # the hint: attn_mask is the causal mask; the kernel applies it, skipping tiles
            mask = _padding_mask_for_causal(kpm, am, q.dtype)
        else:
            if am is not None and am.dim() == 3:  # (B * H, L, S)
                am = am.reshape(b, h, l, s)
            mask = _combine(am, kpm, q.dtype)
        dropout = self.dropout if self.training else 0.0
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=bool(is_causal))
        # (B, H, L, Ev) -> (L, B, E) or (B, L, E)
        out = out.permute(2, 0, 1, 3).reshape(l, b, e) if seq_first else out.transpose(1, 2).reshape(b, l, e)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)  # as torch: out_proj's hooks do not run
        if nan_rows and mask is not None:  # (no host sync: a GPU call, a compiled or captured one, runs on)
            dead = _rows_seeing_nothing(mask, bool(is_causal), b, l)  # (B, L)
            out = out.masked_fill((dead.t() if seq_first else dead)[..., None], float("nan"))
        return out


def _tracing() -> bool:
    """Whether torch's MultiheadAttention leaves its fast path for tracing: its own test where this
    torch has it (make_fx and torch.export; under torch.compile as this torch's Dynamo evaluates it),
    else torch.compile or torch.export."""
    make_fx_tracing = getattr(torch.nn.modules.activation, "_is_make_fx_tracing", None)
    if make_fx_tracing is not None:
        return make_fx_tracing()
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (exporting is not None and exporting())


def _rows_seeing_nothing(mask: torch.Tensor, is_causal: bool, b: int, l: int) -> torch.Tensor:
    """(B, L) bool: the queries for which ``mask`` (an SDPA mask broadcastable to (B, H, L, S): bool
    True = attend, or additive) leaves no key in some head; with ``is_causal`` (self-attention, the
    mask then (B, 1, 1, S)), also none at or before the query's own position."""
    allowed = mask if mask.dtype == torch.bool else mask != float("-inf")
    allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
    if is_causal:  # query i sees keys j <= i: nothing if the first allowed key comes after i
        keys = allowed[:, 0, 0]  # (B or 1, S)
        first = torch.where(keys.any(-1), keys.int().argmax(-1), keys.shape[-1])  # (B or 1,)
        dead = torch.arange(l, device=mask.device) < first[:, None]
    else:
        dead = (~allowed.any(-1)).any(1)  # (B or 1, L or 1)
    return dead.expand(b, l)
