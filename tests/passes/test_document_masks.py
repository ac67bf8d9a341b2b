"""Document masks (passes/masks.py, issue 21.3): packed sequences read from the mask however it is spelled.

A mask factor `D[.., q] == D[.., k]` (one tensor of ids at the query's and the key's position) is the op's
document mode; position bounds `P[k] <= P[q]` (HF's packed causal) are index causal within documents only when D
is proven to be the runs of P stepping by one. What is not that (`!=`, a shifted read, two tensors, positions
without that proof) stays a data mask, a bias. Classified here on CPU whatever the op side takes; the analyzer's
use of it is gated on the op's `doc_ids` (checked both ways).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlower.passes.analyze import analyze_site
from attnlower.target import Target
from helpers import found_sites

B, H, T, D = 2, 2, 11, 8
LENGTHS = [[3, 5, 3], [6, 5]]


def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(3)]


def ids():
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in LENGTHS])


def positions():
    return torch.stack([torch.cat([torch.arange(n) for n in r]) for r in LENGTHS])


def mask_of(fn, *args):
    (site,) = found_sites(fn, *args, last="classify_masks")
    assert site.open, site.refusal
    return site, site.mask


def flex_1d(q, k, v, doc):          # FlexAttention's example: one id row shared by the batch
    i = torch.arange(q.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(doc[:, None] == doc[None, :]) & (i[:, None] >= i[None, :]))


def restarting(q, k, v, pos):       # documents from positions restarting at 0, a tril mask, masked_fill
    doc = (pos == 0).cumsum(-1)
    same = doc[:, None, :, None] == doc[:, None, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    s = (q @ k.mT / D ** 0.5).masked_fill(~(same & causal), float("-inf"))
    return s.softmax(-1) @ v


def hf_packed(q, k, v, pos, window=0):
    """transformers' packing, written out: documents from find_packed_sequence_indices, causal (and the window)
    remapped to the positions, read through index tensors, an additive finfo.min mask."""
    doc = (torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1).cumsum(-1)
    b = torch.arange(pos.shape[0])[:, None, None, None]
    qi, ki = torch.arange(T)[None, None, :, None], torch.arange(T)[None, None, None, :]
    keep = pos[b, ki] <= pos[b, qi]
    if window:
        keep = keep & (pos[b, ki] > pos[b, qi] - window)
    keep = keep & (doc[b, qi] == doc[b, ki])
    bias = torch.where(keep, 0.0, torch.finfo(q.dtype).min)
    return ((q @ k.mT / D ** 0.5) + bias).softmax(-1) @ v


def hf_packed_window(q, k, v, pos):
    return hf_packed(q, k, v, pos, window=3)


@pytest.mark.parametrize("fn,data,kind,window", [
    (flex_1d, lambda: ids()[0], "causal+document", 0),
    (restarting, positions, "causal+document", 0),
    (hf_packed, positions, "causal+document", 0),
    (hf_packed_window, positions, "band+document", 3),
])
def test_document_spellings_are_classified(fn, data, kind, window):
    site, mask = mask_of(fn, *qkv(), data())
    assert (mask.kind, mask.window, mask.bottom_right) == (kind, window, False), mask.reason
    assert mask.documents is not None and "document" in mask.reason, mask


def test_hf_positions_make_the_documents_computed_from_them():
    _, mask = mask_of(hf_packed, *qkv(), positions())
    assert [n.target.__name__.split(".")[0] for n in mask.documents_from_positions] == ["diff", "ne", "cumsum"]
    assert "runs of" in mask.reason


def not_equal(q, k, v, doc):        # across documents: an inequality
    return F.scaled_dot_product_attention(q, k, v, attn_mask=doc[:, None, :, None] != doc[:, None, None, :])


def shifted(q, k, v, doc):          # D[q] == D[k + 1]: not the key's own document
    nxt = torch.cat([doc[:, 1:], doc[:, -1:]], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=doc[:, None, :, None] == nxt[:, None, None, :])


def two_tensors(q, k, v, doc, other):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=doc[:, None, :, None] == other[:, None, None, :])


def positions_without_their_runs(q, k, v, pos, doc):
    # the ids are given, not computed from the positions: P[k] <= P[q] is not proven causal within them
    keep = (pos[:, None, None, :] <= pos[:, None, :, None]) & (doc[:, None, :, None] == doc[:, None, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("fn,extra", [(not_equal, lambda: [ids()]), (shifted, lambda: [ids()]),
                                      (two_tensors, lambda: [ids(), ids().flip(-1)]),
                                      (positions_without_their_runs, lambda: [positions(), ids()])])
def test_what_is_not_document_masking_stays_a_data_mask(fn, extra):
    _, mask = mask_of(fn, *qkv(), *extra())
    assert mask.kind == "tensor" and mask.documents is None, mask


def test_the_analyzer_passes_documents():
    site, mask = mask_of(restarting, *qkv(), positions())
    d = analyze_site(site.match, Target("cpu"), ("flash_attention", "sliding_window_attention"), site.mask)
    assert (d.spec.documents, d.spec.causal, d.bias.kind) == (True, True, "none"), d.reason
    assert "passed as doc_ids" in d.reason
