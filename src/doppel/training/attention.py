"""Varlen attention for packed rows without the flash-attn package: each session attends to itself only.

transformers' SDPA path turns restarting `position_ids` into a dense block-diagonal mask, so every
query still meets every key of its row and the masked scores are computed and thrown away (a 1024-token
row of 60-token sessions computes about 17 times the attention it keeps). `varlen` instead cuts the row
at the sessions' starts and computes each session's causal attention alone:

- on CUDA, with PyTorch's own `torch.nn.attention.varlen.varlen_attn` (its bundled flash kernel, one
  launch for the whole row) where this torch has it;
- otherwise one causal `scaled_dot_product_attention` per session (on CPU the sessions of a row are few
  and the kernel calls cheap next to the work they skip).

Sessions are found from the positions alone, as transformers finds them for its packed masks (a
position that does not continue the one before starts a session); several rows are laid end to end.
Training gives it the micro-batch as one row (the collator's `flatten`, as for flash attention), so no
row is padded to the longest. Calls with a padding mask or a cache longer than the queries (generation)
go to transformers' SDPA unchanged.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from typing import Any

VARLEN = "varlen"


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _mask)


def _mask(*, q_length: int, kv_length: int, attention_mask: Any = None, **kwargs: Any) -> Any:
    """No mask for rows without padding and without a cache (training: the sessions come from the positions);
    anything else gets transformers' SDPA mask, which the SDPA fallback then takes."""
    from transformers.masking_utils import sdpa_mask

    if q_length == kv_length and (attention_mask is None or bool(attention_mask.all())):
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs)


def session_starts(position_ids: Any) -> Any:
    """Cumulative session offsets (int32, first 0, last the row length) of one row of restarting positions.

    A session starts wherever the position does not continue the previous one by 1, as transformers
    decides for its packed masks.
    """
    import torch

    row = position_ids[0]
    starts = torch.nonzero(row[1:] - row[:-1] != 1).flatten() + 1
    zero = torch.zeros(1, dtype=starts.dtype, device=row.device)
    end = torch.full((1,), row.numel(), dtype=starts.dtype, device=row.device)
    return torch.cat([zero, starts, end]).to(torch.int32)


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, position_ids: Any = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function contract: q (B, H, T, D), k/v (B, H_kv, T, D) → ((B, T, H, D), None).

    Several rows are laid end to end first (each row's first position is a new session's start).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    if attention_mask is not None or position_ids is None or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if batch > 1:
        query, key, value = (t.transpose(0, 1).reshape(1, t.shape[1], batch * length, dim) for t in (query, key, value))
        position_ids = position_ids.expand(batch, length).reshape(1, batch * length)
    bounds, cuts, longest = _spans(position_ids)
    if query.is_cuda and dropout == 0.0 and _torch_varlen() is not None:
        out = _flash_varlen(query, key, value, bounds, longest, scaling)
    else:
        out = _per_session(query, key, value, cuts, dropout, scaling)
    return out.reshape(batch, length, heads, dim), None


_last_spans: list[Any] = [None, None]


def _spans(position_ids: Any) -> tuple[Any, list[int], int]:
    """`session_starts` of the row, on its device and as a list, and the longest session: every layer of a
    forward gets the same `position_ids` tensor, so they are worked out (and the device read) once."""
    if _last_spans[0] is not position_ids:
        bounds = session_starts(position_ids)
        cuts = bounds.tolist()
        _last_spans[:] = [position_ids, (bounds, cuts, max(b - a for a, b in itertools.pairwise(cuts)))]
    return _last_spans[1]


def _per_session(query: Any, key: Any, value: Any, bounds: list[int], dropout: float, scaling: float | None) -> Any:
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    gqa = query.shape[1] != key.shape[1]
    outputs = [scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                            is_causal=True, scale=scaling, enable_gqa=gqa)
               for a, b in itertools.pairwise(bounds)]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


@functools.cache
def _torch_varlen() -> tuple[Any, frozenset[str]] | None:
    """PyTorch's varlen kernel and the names of its parameters (its signature changed between releases)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen(query: Any, key: Any, value: Any, bounds: Any, longest: int, scaling: float | None) -> Any:
    """PyTorch's varlen flash kernel on (T, H, D) tensors, called as this torch release's signature wants."""
    found = _torch_varlen()
    assert found is not None
    varlen_attn, params = found
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    options: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" in params:
        options["scale"] = scaling
    elif scaling is not None:  # the kernel's fixed scale is 1/sqrt(D)
        q = q * (scaling * math.sqrt(q.shape[-1]))
    out = varlen_attn(q, k, v, bounds, bounds, longest, longest, **options)
    return out.unsqueeze(0)
