"""Mask classification on graphs made the way the backend makes them: Dynamo, then `to_aten`.

Each test writes attention with one mask spelling, compiles it with a capturing backend, finds the
mask at the softmax's input and checks every field of the `MaskInfo` the classifier proves.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import pytest

from attnlower.passes.canonicalize import to_aten
from attnlower.passes.masks import LENGTH_KINDS, classify_length_mask, classify_mask
from attnlower.passes.site import MaskInfo

import spellings_issue22 as S

aten = torch.ops.aten
NEG = torch.finfo(torch.float32).min


def trace(fn, *args, dynamic=False) -> fx.GraphModule:
    """The pre-dispatch aten graph the backend's passes would see for `fn(*args)`."""
    graphs: list[fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(to_aten(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=dynamic, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def mask_site(gm: fx.GraphModule):
    """(mask node, polarity, Tq, Tk) of the graph's one softmax: what the detector hands the classifier."""
    (softmax,) = [n for n in gm.graph.nodes if n.op == "call_function" and "softmax" in str(n.target)]
    scores = softmax.args[0]
    q_len, k_len = softmax.meta["val"].shape[-2:]
    name = scores.target.overloadpacket.__name__
    if name == "masked_fill":
        return scores.args[1], "fill", q_len, k_len
    if name == "where":
        return scores.args[0], "keep", q_len, k_len
    assert name == "add", f"unexpected score op {scores.target}"
    (mask,) = [a for a in scores.args if not _is_qk_product(a)]
    return mask, "additive", q_len, k_len


def _is_qk_product(node: fx.Node) -> bool:
    # pre-dispatch keeps `matmul`; post-dispatch spells it `bmm` then a view back to 4-D
    if node.target is aten.matmul.default:
        return True
    return node.target in (aten.view.default, aten._unsafe_view.default) and node.args[0].target is aten.bmm.default


def classify(fn, *args, dynamic=False) -> MaskInfo:
    mask, polarity, q_len, k_len = mask_site(trace(fn, *args, dynamic=dynamic))
    return classify_mask(mask, polarity, q_len, k_len)


def check(info: MaskInfo, kind, causal=False, bottom_right=False, window=0, data_dependent=False):
    assert (info.kind, info.causal, info.bottom_right, info.window, info.data_dependent) == (
        kind, causal, bottom_right, window, data_dependent
    ), info
    assert info.reason


def qkv(tq=32, tk=None, batch=2, heads=4, dim=16):
    tk = tq if tk is None else tk
    q = torch.randn(batch, heads, tq, dim)
    return q, torch.randn(batch, heads, tk, dim), torch.randn(batch, heads, tk, dim)


def scores(q, k):
    return q @ k.transpose(-1, -2)


# ---- tril / triu spellings -------------------------------------------------------------------


def tril_keep(q, k, v):
    causal = torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool))
    return torch.where(causal, scores(q, k), float("-inf")).softmax(-1) @ v


def triu_fill(q, k, v):
    future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
    return scores(q, k).masked_fill(future, float("-inf")).softmax(-1) @ v


def not_tril_fill(q, k, v):
    causal = torch.ones(q.shape[-2], k.shape[-2]).tril().bool()
    return scores(q, k).masked_fill(~causal, float("-inf")).softmax(-1) @ v


def one_minus_tril_additive(q, k, v):
    causal = torch.tril(torch.ones(q.shape[-2], k.shape[-2]))
    return (scores(q, k) + (1.0 - causal) * NEG).softmax(-1) @ v


def float_tril_eq_zero(q, k, v):
    # nanoGPT's `bias == 0` on a float tril, but built in forward: only sizes, no buffer
    causal = torch.tril(torch.ones(1, 1, q.shape[-2], k.shape[-2]))
    return scores(q, k).masked_fill(causal == 0, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize(
    "fn", [tril_keep, triu_fill, not_tril_fill, one_minus_tril_additive, float_tril_eq_zero], ids=lambda f: f.__name__
)
def test_tril_triu_spellings_are_causal(fn):
    check(classify(fn, *qkv(37)), "causal", causal=True)


def test_tril_with_positive_diagonal_is_not_causal():
    def fn(q, k, v):
        shifted = torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool), diagonal=1)
        return torch.where(shifted, scores(q, k), float("-inf")).softmax(-1) @ v

    info = classify(fn, *qkv(16))
    check(info, "tensor")
    assert "not causal" in info.reason


def test_tril_of_rectangle_is_top_left():
    # torch.tril on [Tq, Tk] aligns top-left, even when Tq < Tk
    check(classify(tril_keep, *qkv(8, 32)), "causal", causal=True, bottom_right=False)


# ---- arange comparisons ----------------------------------------------------------------------


def arange_mask(window=None, aligned_to_end=False, keep_form=True):
    """`kv <= q` (and `kv > q - window`) on index vectors, optionally offset so the last query sees
    every key (the cache-position convention)."""

    def fn(q, k, v):
        tq, tk = q.shape[-2], k.shape[-2]
        q_idx = torch.arange(tq) + (tk - tq if aligned_to_end else 0)
        kv_idx = torch.arange(tk)
        visible = kv_idx[None, :] <= q_idx[:, None]
        if window is not None:
            visible = visible & (kv_idx[None, :] > q_idx[:, None] - window)
        if keep_form:
            return torch.where(visible, scores(q, k), float("-inf")).softmax(-1) @ v
        return scores(q, k).masked_fill(~visible, float("-inf")).softmax(-1) @ v

    return fn


def test_arange_le_is_causal():
    check(classify(arange_mask(), *qkv(32)), "causal", causal=True)


def test_arange_band():
    check(classify(arange_mask(window=8, keep_form=False), *qkv(32)), "band", causal=True, window=8)


def test_offset_arange_is_bottom_right_when_tq_differs():
    check(classify(arange_mask(aligned_to_end=True), *qkv(8, 32)), "causal", causal=True, bottom_right=True)
    check(
        classify(arange_mask(window=5, aligned_to_end=True), *qkv(8, 32)),
        "band", causal=True, bottom_right=True, window=5,
    )


def test_offset_arange_reports_top_left_when_tq_equals_tk():
    check(classify(arange_mask(aligned_to_end=True), *qkv(24)), "causal", causal=True, bottom_right=False)


def test_window_wider_than_sequence_is_causal():
    check(classify(arange_mask(window=64), *qkv(32)), "causal", causal=True)


def test_symmetric_window_is_not_causal():
    def fn(q, k, v):
        i = torch.arange(q.shape[-2])
        near = (i[None, :] - i[:, None]).abs() < 4
        return torch.where(near, scores(q, k), float("-inf")).softmax(-1) @ v

    info = classify(fn, *qkv(32))
    check(info, "tensor")
    assert "band is not causal" in info.reason


def test_all_visible_is_none():
    def fn(q, k, v):
        everything = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
        return torch.where(everything, scores(q, k), float("-inf")).softmax(-1) @ v

    check(classify(fn, *qkv(32)), "none")


def test_per_head_masks_are_tensor():
    def fn(q, k, v):
        i = torch.arange(q.shape[-2])
        heads = torch.arange(q.shape[1])[:, None, None]
        visible = i[None, None, :] <= i[None, :, None] + heads  # head h sees h keys further
        return torch.where(visible, scores(q, k), float("-inf")).softmax(-1) @ v

    info = classify(fn, *qkv(16))
    check(info, "tensor")
    assert "differs across" in info.reason


# ---- symbolic sizes ----------------------------------------------------------------------------


def test_dynamic_fixed_window_is_band():
    def fn(q, k, v):
        i = torch.arange(q.shape[-2])
        visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 8)
        return torch.where(visible, scores(q, k), float("-inf")).softmax(-1) @ v

    check(classify(fn, *qkv(32), dynamic=True), "band", causal=True, window=8)


def test_dynamic_window_argument_is_not_a_band():
    # with dynamic=True an int argument becomes a SymInt input: the same graph runs for any window
    def fn(q, k, v, window):
        i = torch.arange(q.shape[-2])
        visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        return torch.where(visible, scores(q, k), float("-inf")).softmax(-1) @ v

    info = classify(fn, *qkv(32), 8, dynamic=True)
    check(info, "tensor")
    assert "window changes" in info.reason


def test_dynamic_causal_is_causal():
    check(classify(tril_keep, *qkv(32), dynamic=True), "causal", causal=True)


def test_dynamic_window_depending_on_length_is_not_a_band():
    def fn(q, k, v):
        t = q.shape[-2]
        i = torch.arange(t)
        visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - t // 2)
        return torch.where(visible, scores(q, k), float("-inf")).softmax(-1) @ v

    # at the traced size alone it is a band of width 16: only varying T shows the width moves
    check(classify(fn, *qkv(32)), "band", causal=True, window=16)
    info = classify(fn, *qkv(32), dynamic=True)
    check(info, "tensor")
    assert "window changes" in info.reason


# ---- additive values -----------------------------------------------------------------------------


def additive_causal(value, dtype=torch.float32):
    def fn(q, k, v):
        causal = torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool))
        bias = torch.where(causal, torch.zeros((), dtype=dtype), torch.tensor(value, dtype=dtype))
        return (scores(q, k) + bias).softmax(-1) @ v

    return fn


@pytest.mark.parametrize(
    "value, dtype",
    [(NEG, torch.float32), (float("-inf"), torch.float32), (torch.finfo(torch.float16).min, torch.float16)],
    ids=["finfo_min", "neg_inf", "fp16_min"],
)
def test_where_zero_finfo_min_is_causal(value, dtype):
    q, k, v = (t.to(dtype) for t in qkv(16))
    check(classify(additive_causal(value, dtype), q, k, v), "causal", causal=True)


def test_bert_style_minus_10000_is_a_bias():
    info = classify(additive_causal(-10000.0), *qkv(16))
    check(info, "tensor")
    assert "general bias" in info.reason


def test_alibi_ramp_is_a_bias():
    def fn(q, k, v):
        i = torch.arange(q.shape[-2])
        ramp = (i[None, :] - i[:, None]).clamp(max=0).float() * 0.5
        return (scores(q, k) + ramp).softmax(-1) @ v

    info = classify(fn, *qkv(16))
    check(info, "tensor")
    assert "general bias" in info.reason


# ---- data-dependent masks ------------------------------------------------------------------------


def hf_style(window=None):
    """HF `masking_utils` spelled out like the spellings show: batch/q/kv index vectors, `new_ones`,
    `&`-chained mask functions, the 2-D padding mask indexed by [batch, kv], `expand`, then
    `where(mask, 0, finfo.min)` as the eager path does."""

    def fn(q, k, v, attention_mask):
        batch, tq, tk = q.shape[0], q.shape[-2], k.shape[-2]
        padding = attention_mask.to(torch.bool)
        b_idx = torch.arange(batch)[:, None, None, None]
        q_idx = (torch.arange(tq) + (tk - tq))[None, None, :, None]
        kv_idx = torch.arange(tk)[None, None, None, :]
        visible = q_idx.new_ones((), dtype=torch.bool)
        if window is not None:
            visible = visible & (kv_idx > q_idx - window)
        visible = visible & (kv_idx <= q_idx)
        visible = visible & padding[b_idx, kv_idx]
        visible = visible.expand(batch, -1, tq, tk)
        bias = torch.where(visible, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
        return (scores(q, k) + bias).softmax(-1) @ v

    return fn


def left_padded(batch, tk, pad=5):
    mask = torch.ones(batch, tk, dtype=torch.long)
    mask[0, :pad] = 0
    return mask


def test_hf_causal_with_padding():
    info = classify(hf_style(), *qkv(32), left_padded(2, 32))
    check(info, "causal+padding", causal=True, data_dependent=True)
    assert "padding" in info.reason


def test_hf_sliding_window_with_padding_and_cache_offset():
    check(
        classify(hf_style(window=8), *qkv(32), left_padded(2, 32)),
        "band+padding", causal=True, window=8, data_dependent=True,
    )
    check(
        classify(hf_style(window=8), *qkv(8, 32), left_padded(2, 32)),
        "band+padding", causal=True, bottom_right=True, window=8, data_dependent=True,
    )


def test_hf_dynamic_causal_with_padding():
    check(
        classify(hf_style(), *qkv(32), left_padded(2, 32), dynamic=True),
        "causal+padding", causal=True, data_dependent=True,
    )


def test_bert_padding_only():
    def fn(q, k, v, attention_mask):
        bias = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * NEG
        return (scores(q, k) + bias).softmax(-1) @ v

    check(classify(fn, *qkv(16), left_padded(2, 16)), "padding", data_dependent=True)


@pytest.mark.parametrize("combine", [torch.add, torch.minimum], ids=["sum", "minimum"])
def test_additive_causal_combined_with_additive_padding(combine):
    def fn(q, k, v, attention_mask):
        causal = torch.full((q.shape[-2], k.shape[-2]), NEG).triu(1)  # 0 on and below the diagonal
        padding = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * NEG
        return (scores(q, k) + combine(causal, padding)).softmax(-1) @ v

    check(classify(fn, *qkv(16), left_padded(2, 16)), "causal+padding", causal=True, data_dependent=True)


def test_query_dependent_input_mask_is_tensor():
    def fn(q, k, v, mask):
        return torch.where(mask, scores(q, k), float("-inf")).softmax(-1) @ v

    info = classify(fn, *qkv(16), torch.rand(2, 1, 16, 16) > 0.2)
    check(info, "tensor", data_dependent=True)
    assert "reads tensor input" in info.reason


# ---- factors under a view that inserts size-1 dims ---------------------------------------------------
# A mask built as [B, Tq, Tk] (a key-padding mask `[:, None, :]` and-ed with a causal `[None]`) and given its
# head dim afterwards, in the middle: the conjunction sits under the view, and each factor's dims keep their
# meaning through it (the padding runs along the keys, the triangle along queries and keys).

HEAD_DIM_INSERTED = {
    "index_none": lambda m: m[:, None],                                   # minGPT / lucidrains
    "unsqueeze": lambda m: m.unsqueeze(1),                                # the Annotated Transformer
    "view": lambda m: m.view(m.size(0), 1, m.size(1), m.size(2)),
    "unsqueeze_expand": lambda m: m.unsqueeze(1).expand(-1, 4, -1, -1),   # one copy per head (4 heads)
    "reshape_twice": lambda m: m.reshape(m.size(0), 1, 1, m.size(1), m.size(2)).squeeze(1),
}


def padding_then_heads(insert, causal_first=False, window=None, along="keys"):
    def fn(q, k, v, attention_mask):
        tq, tk = q.shape[-2], k.shape[-2]
        causal = torch.ones(tq, tk, dtype=torch.bool).tril()
        if window is not None:
            causal = causal & ~torch.ones(tq, tk, dtype=torch.bool).tril(-window)
        keep = attention_mask.bool()
        keep = keep[:, None, :] if along == "keys" else keep[:, :, None]
        mask = causal[None] & keep if causal_first else keep & causal[None]      # [B, Tq, Tk]
        return scores(q, k).masked_fill(~HEAD_DIM_INSERTED[insert](mask), float("-inf")).softmax(-1) @ v

    return fn


@pytest.mark.parametrize("insert", sorted(HEAD_DIM_INSERTED))
@pytest.mark.parametrize("causal_first", [False, True], ids=["padding_first", "causal_first"])
def test_factors_under_a_head_dim_inserted_afterwards(insert, causal_first):
    info = classify(padding_then_heads(insert, causal_first), *qkv(16), left_padded(2, 16))
    check(info, "causal+padding", causal=True, data_dependent=True)


def test_a_band_under_a_head_dim_inserted_afterwards():
    info = classify(padding_then_heads("unsqueeze", window=4), *qkv(16), left_padded(2, 16))
    check(info, "band+padding", causal=True, window=4, data_dependent=True)


def test_factors_under_a_view_dynamic():
    info = classify(padding_then_heads("index_none"), *qkv(16), left_padded(2, 16), dynamic=True)
    check(info, "causal+padding", causal=True, data_dependent=True)


def test_padding_lifted_through_a_view_stays_on_its_own_dim():
    """The same mask with the padding laid along the queries (`[:, :, None]`): lifted through the view it runs
    along Tq, not Tk, so it is no key-padding mask, and the dims must not be read right-aligned."""
    info = classify(padding_then_heads("unsqueeze", along="queries"), *qkv(16), left_padded(2, 16))
    check(info, "tensor", data_dependent=True)
    assert "[2, 1, 16, 1]" in info.reason, info.reason


def test_a_view_that_merges_dims_is_not_lifted():
    """A view that moves values across dims ([B, Tq*Tk] -> [B, 1, Tq, Tk]) keeps the conjunction one factor."""
    def fn(q, k, v, attention_mask):
        tq, tk = q.shape[-2], k.shape[-2]
        mask = attention_mask.bool()[:, None, :] & torch.ones(tq, tk, dtype=torch.bool).tril()[None]
        flat = mask.reshape(mask.size(0), tq * tk)
        return scores(q, k).masked_fill(~flat.view(-1, 1, tq, tk), float("-inf")).softmax(-1) @ v

    check(classify(fn, *qkv(16), left_padded(2, 16)), "tensor", data_dependent=True)


class KeyPaddingDecoder(torch.nn.Module):
    """A decoder self-attention that builds its mask once as [B, Tq, Tk], a HF / fairseq-style key-padding mask
    (`attention_mask[:, None, :]`, 1 = a token) and-ed with `tril(...)[None]`, and gives it the head dim in the
    middle afterwards (`HEAD_DIM_INSERTED`), masking with -inf."""

    def __init__(self, insert: str, heads: int = 4, dim: int = 16):
        super().__init__()
        self.insert, self.heads, self.dim = insert, heads, dim
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)
        self.proj = torch.nn.Linear(heads * dim, heads * dim)

    def forward(self, x, attention_mask):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        mask = causal[None] & attention_mask.bool()[:, None, :]
        s = (q @ k.transpose(-2, -1)) * self.dim ** -0.5
        s = s.masked_fill(~HEAD_DIM_INSERTED[self.insert](mask), float("-inf"))
        return self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


def assert_causal_and_padding(sites):
    """The report proves causal+padding, and the op skips the blocks above the diagonal: `causal=True`, with
    the mask as its bool bias (the padding)."""
    S.assert_site(S.only(sites), "flash_attention", mask="causal+padding", causal=True, bias_kind="bool")


@pytest.mark.parametrize("insert,inner", [(name, "eager") for name in sorted(HEAD_DIM_INSERTED)]
                         + [("index_none", "inductor")])
def test_key_padding_under_the_head_view_compiles_to_causal(insert, inner):
    """Left padding: the first queries of row 0 see only pad keys, NaN in eager and in the op (empty rows)."""
    model = KeyPaddingDecoder(insert).eval()
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
    _, sites = S.check_forward(model, x, left_padded(2, 37), inner=inner)
    assert_causal_and_padding(sites)


def test_key_padding_under_the_head_view_gradients():
    """Right padding (as for training): every query keeps key 0, the gradients are finite and equal eager's."""
    model = KeyPaddingDecoder("unsqueeze").train()
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    attention_mask = torch.ones(2, 37, dtype=torch.long)
    attention_mask[1, 30:] = 0
    assert_causal_and_padding(S.check_training(model, x, attention_mask))


class NanoGPTMask(torch.nn.Module):
    """nanoGPT's manual path: a registered tril buffer, sliced to T and compared with 0."""

    def __init__(self, block_size=64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v):
        t = q.shape[-2]
        return scores(q, k).masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf")).softmax(-1) @ v


def test_nanogpt_buffer_is_data_dependent():
    # the buffer's content can change without a recompile, so it is not proven causal
    info = classify(NanoGPTMask(), *qkv(32))
    check(info, "tensor", data_dependent=True)
    assert "reads tensor input" in info.reason


def test_mask_written_in_place_is_tensor():
    def fn(q, k, v):
        causal = torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool))
        causal[:, 0] = False  # the node `tril` no longer holds the value the softmax sees
        return torch.where(causal, scores(q, k), float("-inf")).softmax(-1) @ v

    info = classify(fn, *qkv(16))
    check(info, "tensor")
    assert "written in place" in info.reason


# ---- other graph forms and contract ---------------------------------------------------------------


def test_post_dispatch_symbolic_graph():
    # make_fx without pre-dispatch, symbolic sizes: the form other tools (AOTAutograd) hand over
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(hf_style(window=4), tracing_mode="symbolic")(*qkv(16), left_padded(2, 16))
    mask, polarity, q_len, k_len = mask_site(gm)
    check(
        classify_mask(mask, polarity, q_len, k_len),
        "band+padding", causal=True, window=4, data_dependent=True,
    )


def test_refuses_large_evaluations():
    # a 16k x 16k pattern is over the evaluation limit: refused with a reason, not evaluated
    graph = fx.Graph()
    ones = graph.call_function(aten.ones.default, ([16384, 16384],), {"dtype": torch.bool})
    ones.meta["val"] = torch.empty(16384, 16384, dtype=torch.bool, device="meta")
    graph.output(ones)
    info = classify_mask(ones, "keep", 16384, 16384)
    check(info, "tensor")
    assert "limit" in info.reason


def test_bad_polarity_raises():
    gm = trace(tril_keep, *qkv(8))
    mask, _, q_len, k_len = mask_site(gm)
    with pytest.raises(ValueError, match="polarity"):
        classify_mask(mask, "bool", q_len, k_len)


def test_real_hf_masks():
    mu = pytest.importorskip("transformers.masking_utils")

    def make(mask_function_of):
        def fn(q, k, v, attention_mask):
            tq, tk = q.shape[-2], k.shape[-2]
            mask_function = mask_function_of(q.shape[0])
            visible = mu.sdpa_mask(
                batch_size=q.shape[0], q_length=tq, kv_length=tk, q_offset=tk - tq,
                mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
            )
            return torch.where(visible, scores(q, k), float("-inf")).softmax(-1) @ v

        return fn

    args = (*qkv(8, 24), left_padded(2, 24).bool())  # HF turns the 2-D mask to bool first
    causal = classify(make(lambda batch: mu.causal_mask_function), *args)
    check(causal, "causal+padding", causal=True, bottom_right=True, data_dependent=True)
    sliding = classify(make(lambda batch: mu.sliding_window_causal_mask_function(6)), *args)
    check(sliding, "band+padding", causal=True, bottom_right=True, window=6, data_dependent=True)
    bidirectional = classify(make(lambda batch: mu.sliding_window_bidirectional_mask_function(3)), *args)
    check(bidirectional, "tensor", data_dependent=True)
    assert "band is not causal" in bidirectional.reason
    no_left_padding = lambda batch: torch.zeros(batch, dtype=torch.long)  # noqa: E731
    chunked = classify(make(lambda batch: mu.chunked_causal_mask_function(4, no_left_padding(batch))), *args)
    check(chunked, "tensor", data_dependent=True)
    assert "neither full, causal nor a causal band" in chunked.reason


def test_real_mistral_sdpa_dynamic_sliding_window():
    # a whole (tiny) model: HF builds the mask, SDPA takes it as a bool keep-mask, sizes are symbolic
    # and the graph also holds a SymFloat (the attention scale), which must keep its value
    transformers = pytest.importorskip("transformers")
    config = transformers.MistralConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8,
    )
    config._attn_implementation = "sdpa"
    model = transformers.MistralForCausalLM(config).eval()
    graphs: list[fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(to_aten(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=True)(
            input_ids=torch.randint(0, 100, (2, 32)), attention_mask=left_padded(2, 32), use_cache=False
        )
    (sdpa,) = [n for g in graphs for n in g.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    info = classify_mask(mask, "keep", sdpa.args[0].meta["val"].shape[-2], sdpa.args[1].meta["val"].shape[-2])
    check(info, "band+padding", causal=True, window=8, data_dependent=True)
    assert "4 sizes" in info.reason


# ---- length masks, proven structurally: the lengths the paged op reads --------------------------

LENGTHS = torch.tensor([5, 11])


def length_site(fn, *args):
    """(mask, polarity, Tq, Tk, the graph's placeholder holding the lengths) of `fn`'s one masked softmax."""
    gm = trace(fn, *args)
    mask, polarity, q_len, k_len = mask_site(gm)
    (lengths,) = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta["val"].dim() == 1]
    return mask, polarity, q_len, k_len, lengths


def read_lengths(mask, polarity, q_len, k_len):
    """The mask read as the paged op's (`classify_length_mask`), applied to [B, H, Tq, Tk] scores."""
    return classify_length_mask([(mask, polarity, False)], q_len, k_len)


def positions_lt_lengths(q, k, lens):
    # the padding mask of a ragged batch as serving code writes it: key position < the sequence's length
    keep = torch.arange(k.shape[-2])[None, None, None, :] < lens[:, None, None, None]
    return scores(q, k).masked_fill(~keep, float("-inf")).softmax(-1)


def lengths_gt_positions(q, k, lens):
    return torch.where(lens.view(-1, 1, 1, 1) > torch.arange(k.shape[-2]).view(1, 1, 1, -1), scores(q, k),
                       float("-inf")).softmax(-1)


def positions_ge_lengths_filled(q, k, lens):
    # attnlower.cache.length_mask's complement, filled: HF's `masked_fill(padding, finfo.min)` shape
    pad = torch.arange(k.shape[-2]).view(1, 1, 1, -1) >= lens.view(-1, 1, 1, 1)
    return scores(q, k).masked_fill(pad, float("-inf")).softmax(-1)


@pytest.mark.parametrize("fn", [lengths_gt_positions, positions_ge_lengths_filled, positions_lt_lengths])
def test_length_mask_gives_the_lengths(fn):
    mask, polarity, q_len, k_len, lengths = length_site(fn, *qkv(4, 12)[:2], LENGTHS)
    info = read_lengths(mask, polarity, q_len, k_len)
    assert info.kind == "length" and info.lengths is lengths and not info.causal, info
    other = {"keep": "fill", "fill": "keep"}[polarity]
    flipped = read_lengths(mask, other, q_len, k_len)      # the same comparison, read the other way
    assert flipped.kind not in LENGTH_KINDS, flipped


def test_positions_must_start_at_zero_and_span_the_keys():
    def shifted(q, k, lens):
        keep = torch.arange(1, k.shape[-2] + 1)[None, None, None, :] < lens[:, None, None, None]
        return torch.where(keep, scores(q, k), float("-inf")).softmax(-1)

    def one_short(q, k, lens):
        keep = torch.arange(k.shape[-2] - 1)[None, None, None, :] < lens[:, None, None, None]
        return torch.where(F_pad(keep), scores(q, k), float("-inf")).softmax(-1)

    for fn in (shifted, one_short):
        mask, polarity, q_len, k_len, _ = length_site(fn, *qkv(4, 12)[:2], LENGTHS)
        info = read_lengths(mask, polarity, q_len, k_len)
        assert info.kind not in LENGTH_KINDS, (fn.__name__, info)
    # the shifted positions are read exactly: j + 1 < L[b] is a bound the paged op does not compute
    mask, polarity, q_len, k_len, _ = length_site(shifted, *qkv(4, 12)[:2], LENGTHS)
    assert "is not one the paged op computes" in read_lengths(mask, polarity, q_len, k_len).reason


def F_pad(keep):
    """`keep` with one more key column, always visible (so the mask still covers every key)."""
    return torch.cat([keep, torch.ones_like(keep[..., :1])], dim=-1)


def test_lengths_laid_along_heads_or_a_causal_compare_are_not_lengths():
    def per_head(q, k, lens):   # lens broadcast as [1, H, 1, 1]: one length per head, not per sequence
        keep = torch.arange(k.shape[-2]).view(1, 1, 1, -1) < lens.view(1, -1, 1, 1)
        return torch.where(keep, scores(q, k), float("-inf")).softmax(-1)

    mask, polarity, q_len, k_len, _ = length_site(per_head, *qkv(4, 12, heads=2)[:2], LENGTHS)
    info = read_lengths(mask, polarity, q_len, k_len)
    assert info.kind not in LENGTH_KINDS and "not at the batch index" in info.reason, info

    def causal(q, k):
        t = q.shape[-2]
        keep = torch.arange(t).view(1, 1, -1, 1) >= torch.arange(t).view(1, 1, 1, -1)
        return torch.where(keep, scores(q, k), float("-inf")).softmax(-1)

    mask, polarity, q_len, k_len = mask_site(trace(causal, *qkv(6)[:2]))
    info = read_lengths(mask, polarity, q_len, k_len)
    assert info.kind not in LENGTH_KINDS and "top-left" in info.reason, info


# chunked prefill: Tq new queries at the end of each sequence, query i at position L[b] - Tq + i

def chunk_causal(q, k, lens):
    tq = q.shape[-2]
    pos = lens[:, None] - tq + torch.arange(tq)[None, :]                          # [B, Tq]
    hidden = (torch.arange(k.shape[-2])[None, None, :] >= lens[:, None, None]) | \
             (torch.arange(k.shape[-2])[None, None, :] > pos[:, :, None])
    return scores(q, k).masked_fill(hidden[:, None], float("-inf")).softmax(-1)


def chunk_band(q, k, lens):
    tq, j = q.shape[-2], torch.arange(k.shape[-2]).view(1, 1, 1, -1)
    pos = (lens.view(-1, 1) - tq + torch.arange(tq).view(1, -1)).view(-1, 1, tq, 1)
    keep = (j <= pos) & (j > pos - 3) & (j < lens.view(-1, 1, 1, 1))
    return torch.where(keep, scores(q, k), float("-inf")).softmax(-1)


def chunk_off_by_one(q, k, lens):
    tq, j = q.shape[-2], torch.arange(k.shape[-2]).view(1, 1, 1, -1)
    pos = (lens.view(-1, 1) - tq + torch.arange(tq).view(1, -1)).view(-1, 1, tq, 1)
    return torch.where((j < pos) & (j < lens.view(-1, 1, 1, 1)), scores(q, k), float("-inf")).softmax(-1)


def test_chunk_causal_aligned_to_each_sequence_end():
    mask, polarity, q_len, k_len, lengths = length_site(chunk_causal, *qkv(4, 12)[:2], LENGTHS)
    info = read_lengths(mask, polarity, q_len, k_len)
    assert info.kind == "causal+length" and info.causal and info.lengths is lengths and info.window == 0, info


def test_chunk_band_and_an_off_by_one_causal():
    mask, polarity, q_len, k_len, _ = length_site(chunk_band, *qkv(4, 12)[:2], LENGTHS)
    info = read_lengths(mask, polarity, q_len, k_len)
    assert info.kind == "band+length" and info.causal and info.window == 3, info
    mask, polarity, q_len, k_len, _ = length_site(chunk_off_by_one, *qkv(4, 12)[:2], LENGTHS)
    info = read_lengths(mask, polarity, q_len, k_len)
    assert info.kind not in LENGTH_KINDS and "j <= L[b] + i - 5" in info.reason, info   # Tq = 4: one key short


def test_finite_length_fill_is_not_a_paged_mask():
    def finite(q, k, lens):
        keep = torch.arange(k.shape[-2]).view(1, 1, 1, -1) < lens.view(-1, 1, 1, 1)
        bias = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        return (scores(q, k) + bias).softmax(-1)

    mask, polarity, q_len, k_len, _ = length_site(finite, *qkv(4, 12)[:2], LENGTHS)
    info = read_lengths(mask, polarity, q_len, k_len)
    assert info.kind not in LENGTH_KINDS and "finite value" in info.reason, info

