"""A naive float64 full-matrix attention oracle shared by the lowering tests.

It repeats K/V for GQA, builds the whole [B, Hq, Tq, Tk] score matrix and masks it explicitly:
every semantic rule of docs/INTERFACES.md section 1 is spelled out once more, independently of
attnlower/lowering/reference.py.
"""
import math

import torch


# (forward atol/rtol, backward atol/rtol) per dtype: the kernel tests' tolerances against this oracle
TOLERANCES = {
    torch.float32: ((2e-5, 1e-5), (5e-5, 1e-5)),
    torch.float16: ((5e-3, 1e-2), (2e-2, 2e-2)),
    torch.bfloat16: ((2e-2, 2e-2), (8e-2, 5e-2)),
}

def oracle(q, k, v, bias=None, alibi=None, scale=None, causal=False, bottom_right=False,
           softcap=0.0, window=0, empty_rows_nan=False, keep=None, dropout_p=0.0, sinks=None, fill=None,
           doc_ids=None):
    """Naive float64 attention; returns (out, lse). Differentiable (no in-place ops).

    sinks [Hq]: a logit column per head in the softmax (no value; lse includes it). fill: masked pairs (bool
    bias False, causal, window, documents) take this score instead of being removed. doc_ids [B|1, Tk]: query i
    (key position i + off) sees key j only when their ids are equal."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    batch, heads, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    off = tk - tq if bottom_right else 0
    i = torch.arange(tq, device=q.device).view(-1, 1) + off
    j = torch.arange(tk, device=q.device).view(1, -1)
    if alibi is not None:
        slopes = alibi.double().view(-1 if alibi.dim() == 2 else 1, q.shape[1], 1, 1)
        s = s + slopes * (j - i)
    visible = torch.ones(s.shape, dtype=torch.bool, device=q.device)
    if bias is not None and bias.dtype == torch.bool:
        visible = visible & bias
    elif bias is not None:
        s = s + bias.double()
    if causal:
        visible = visible & (j <= i)
    if window:
        visible = visible & (j > i - window)
    if doc_ids is not None:
        docs = doc_ids.long().expand(batch, tk)
        visible = visible & (docs[:, off:off + tq][:, None, :, None] == docs[:, None, None, :])
    if fill is not None:
        s = torch.where(visible, s, torch.full_like(s, fill))
        visible = torch.ones_like(visible)
    visible = visible & (s != -math.inf)
    s = torch.where(visible, s, -1e300)  # finite, so autograd through empty rows stays NaN-free
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, heads, 1, 1).expand(batch, heads, tq, 1)], dim=-1)
        # a -inf sink is no key (a row with nothing else is empty); not ones_like(visible[..., :1]): with Tk = 0
        # that slice is empty and the sink column would be lost
        sink_seen = (sinks.view(1, heads, 1, 1) != -math.inf).expand(batch, heads, tq, 1)
        visible = torch.cat([visible, sink_seen], dim=-1)
    has_key = visible.any(-1, keepdim=True)
    p = torch.where(has_key, torch.softmax(s, -1), 0.0)
    lse = torch.where(has_key, torch.logsumexp(s, -1, keepdim=True), -math.inf).squeeze(-1)
    if sinks is not None:
        p = p[..., :-1]
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    out = p @ v
    if empty_rows_nan:
        out = torch.where(has_key, out, math.nan)
    return out, lse
