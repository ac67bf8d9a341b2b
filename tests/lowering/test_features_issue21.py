"""Issue 21 at the op level: a value head dim of its own, attention sinks, document (packed-sequence)
mode, called the way docs/design/issue21.md proposes, against the float64 oracle of
tests/spellings_issue21.py (not attnlower's reference).

Every numeric test runs two ways (the `path` fixture):
- "reference": CPU tensors through the ops' CPU path (lowering/reference.py);
- "kernel": `ATTNLOWER_CPU_KERNELS=triton`, the Triton kernels under TRITON_INTERPRET=1
  (tests/conftest.py), the way CI checks the kernels without a GPU.
Shapes are small and odd (T = 13 / 37, Dqk 20 / 24 / 26 / 40, Dv 16 / 20 / 24 / 40, GQA 6 on 2).
`ATTNLOWER_TEST_DEVICE=cuda` runs the same tests on a GPU; the tests marked `gpu` need one.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import attnlower.ops as ops
import spellings_issue21 as S

OPS = torch.ops.attnlower
F32 = torch.float32



def _randn(*shape, dtype=F32, requires_grad=False, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(requires_grad)


def _check_forward_backward(run, oracle_run, inputs: dict, dtype=F32, check_lse=None):
    """run(**inputs) -> out; oracle_run(**float64 copies) -> (out, lse). Compares out and the gradients
    of every input that requires grad, through sum(out * w) with one random w."""
    out = run(**inputs)
    ref_inputs = {n: (t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                      and t.is_floating_point() else t) for n, t in inputs.items()}
    want, _ = oracle_run(**ref_inputs)
    S.assert_op_close(out, want, dtype, "out")
    trainable = {n: t for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    if not trainable:
        return
    w = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * w).sum().backward()
    (want * w).sum().backward()
    for name, t in trainable.items():
        assert t.grad is not None, f"no gradient reached {name}"
        S.assert_op_close(t.grad, ref_inputs[name].grad, dtype, f"d{name}", backward=True)


# ==============================================================================================
# 1. value head dim != query/key head dim

DIMS = [(24, 16), (20, 40), (40, 24)]     # (Dqk, Dv): smaller, larger, both not powers of two


@pytest.mark.parametrize("dqk,dv", DIMS, ids=[f"qk{a}-v{b}" for a, b in DIMS])
@pytest.mark.parametrize("mode", ["plain", "causal_gqa", "bottom_right_bias"])
def test_flash_value_head_dim_differs(path, dqk, dv, mode):
    """out [B, Hq, Tq, Dv]; dq/dk [.., Dqk], dv [.., Dv]; default scale 1/sqrt(Dqk)."""
    b, hq, hkv, tq, tk = 2, 6, (2 if mode == "causal_gqa" else 6), 37, 37
    if mode == "bottom_right_bias":
        tq = 13
    inputs = dict(q=_randn(b, hq, tq, dqk, requires_grad=True), k=_randn(b, hkv, tk, dqk, requires_grad=True),
                  v=_randn(b, hkv, tk, dv, requires_grad=True))
    kw = {}
    if mode == "causal_gqa":
        kw = dict(causal=True)
    elif mode == "bottom_right_bias":
        kw = dict(causal=True, bottom_right=True)
        inputs["bias"] = _randn(1, hq, tq, tk, requires_grad=True)

    def run(q, k, v, bias=None):
        return ops.flash_attention(q, k, v, bias, **kw)

    def oracle_run(q, k, v, bias=None):
        return S.oracle(q, k, v, bias=bias, **kw)

    _check_forward_backward(run, oracle_run, inputs)
    assert run(**inputs).shape == (b, hq, tq, dv)


def test_sliding_value_head_dim_differs(path):
    inputs = dict(q=_randn(2, 4, 37, 24, requires_grad=True), k=_randn(2, 2, 37, 24, requires_grad=True),
                  v=_randn(2, 2, 37, 16, requires_grad=True))
    _check_forward_backward(lambda q, k, v: ops.sliding_window_attention(q, k, v, 5),
                            lambda q, k, v: S.oracle(q, k, v, causal=True, window=5), inputs)


def _paged_dense(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from a pool [N, Hkv, block, X] -> [1, Hkv, length, X]."""
    block = pool.shape[2]
    t = torch.arange(length)
    return pool[table[t // block].long(), :, t % block].transpose(0, 1).unsqueeze(0)


def _paged_inputs(lens, block, kv_heads, dqk, num_blocks=24):
    """A pool, a shuffled block table (one spare column) and int32 lengths (tests/conftest.py seeds torch)."""
    pool = torch.randn(num_blocks, kv_heads, block, dqk)
    max_blocks = max(-(-n // block) for n in lens) + 1
    table = torch.randperm(num_blocks)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    return pool, table.to(torch.int32).contiguous(), torch.tensor(lens, dtype=torch.int32)


def _paged_oracle(q, k_pool, v_pool, table, lens, *, scale, window=0, sinks=None):
    outs = []
    for b, length in enumerate(lens.tolist()):
        k, v = _paged_dense(k_pool, table[b], length), _paged_dense(v_pool, table[b], length)
        out, _ = S.oracle(q[b:b + 1], k, v, scale=scale, causal=True, bottom_right=True, window=window, sinks=sinks)
        outs.append(out)
    return torch.cat(outs)


@pytest.mark.parametrize("tq", [1, 3], ids=["decode", "chunked_prefill"])
@pytest.mark.parametrize("dims", [(512, 64, 16), (20, 6, 8)], ids=["deepseek_576_512", "odd_26_20"])
def test_paged_mla_absorbed_decode(path, tq, dims):
    """MLA's absorbed decode: one latent KV head shared by every query head (Hkv = 1), keys the whole
    latent row (Dqk = kv_lora_rank + rope), values its first kv_lora_rank dims: the same pool, viewed
    (no copy); the scale is the model's (1/sqrt(192) for DeepSeek-V3), not 1/sqrt(Dqk)."""
    rank, rope, heads = dims
    pool, table, lens = _paged_inputs([37, 50, 5], block=16, kv_heads=1, dqk=rank + rope)
    q = torch.randn(3, heads, tq, rank + rope)
    scale = 192 ** -0.5
    v_pool = pool[..., :rank]
    assert v_pool.data_ptr() == pool.data_ptr() and not v_pool.is_contiguous()
    out = ops.paged_attention(q, pool, v_pool, table, lens, scale=scale)
    want = _paged_oracle(q, pool, v_pool, table, lens, scale=scale)
    assert out.shape == (3, heads, tq, rank)
    S.assert_op_close(out, want, F32, "out")


def test_opcheck_value_head_dim():
    q, k, v = _randn(2, 4, 9, 24, requires_grad=True), _randn(2, 2, 11, 24, requires_grad=True), \
        _randn(2, 2, 11, 16, requires_grad=True)
    opcheck(OPS.flash_attention, (q, k, v), dict(causal=True, bottom_right=True))
    opcheck(OPS.sliding_window_attention, (q, k, v, 3))


# ==============================================================================================
# 2. attention sinks

@pytest.mark.parametrize("mode", ["plain", "causal_gqa", "bias_bottom_right", "softcap"])
def test_flash_sinks(path, mode):
    """A per-head logit in the denominator: out, and gradients to q, k, v, the bias and the sinks."""
    b, hq, hkv, tq, tk = 2, 6, 6, 37, 37
    kw = {}
    if mode == "causal_gqa":
        hkv, kw = 2, dict(causal=True)
    elif mode == "bias_bottom_right":
        tq, kw = 13, dict(causal=True, bottom_right=True)
    elif mode == "softcap":
        kw = dict(softcap=2.0, scale=0.5)
    inputs = dict(q=_randn(b, hq, tq, 24, requires_grad=True), k=_randn(b, hkv, tk, 24, requires_grad=True),
                  v=_randn(b, hkv, tk, 24, requires_grad=True), sinks=_randn(hq, requires_grad=True, scale=2.0))
    if mode == "bias_bottom_right":
        inputs["bias"] = _randn(b, 1, tq, tk, requires_grad=True)

    def run(q, k, v, sinks, bias=None):
        return ops.flash_attention(q, k, v, bias, sinks=sinks, **kw)

    def oracle_run(q, k, v, sinks, bias=None):
        return S.oracle(q, k, v, bias=bias, sinks=sinks, **kw)

    _check_forward_backward(run, oracle_run, inputs)


def test_sinks_lse_includes_the_sink(path):
    """The op's lse is log(sum_j exp(s_j) + exp(sink)): the normalizer the backward recomputes P from."""
    q, k, v = _randn(2, 4, 13, 16), _randn(2, 2, 37, 16), _randn(2, 2, 37, 16)
    sinks = _randn(4, scale=3.0)
    out, lse, _ = OPS.flash_attention(q, k, v, causal=True, bottom_right=True, sinks=sinks)
    want_out, want_lse = S.oracle(q, k, v, causal=True, bottom_right=True, sinks=sinks)
    S.assert_op_close(out, want_out, F32, "out")
    S.assert_op_close(lse, want_lse, F32, "lse")


def test_sinks_rows_without_keys(path):
    """A row whose keys are all masked is not empty with a sink: out 0, lse = sink, gradients 0 and
    finite, even with empty_rows_nan=True (eager GPT-OSS: the sink column takes the whole softmax)."""
    q = _randn(1, 2, 5, 16, requires_grad=True)
    k, v = _randn(1, 2, 7, 16, requires_grad=True), _randn(1, 2, 7, 16, requires_grad=True)
    sinks = _randn(2, requires_grad=True)
    keep = torch.rand(1, 1, 5, 7) > 0.4
    keep[..., 2, :] = False
    out, lse, _ = OPS.flash_attention(q, k, v, keep, empty_rows_nan=True, sinks=sinks)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    torch.testing.assert_close(lse[0, :, 2], sinks.detach())
    want, _ = S.oracle(q, k, v, bias=keep, sinks=sinks)
    S.assert_op_close(out, want, F32, "out")
    out.sum().backward()
    for t in (q, k, v, sinks):
        assert torch.isfinite(t.grad).all()


def test_sliding_sinks(path):
    """GPT-OSS's windowed layers: sinks with a window, Tq < Tk aligned bottom-right."""
    inputs = dict(q=_randn(2, 4, 13, 16, requires_grad=True), k=_randn(2, 2, 37, 16, requires_grad=True),
                  v=_randn(2, 2, 37, 16, requires_grad=True), sinks=_randn(4, requires_grad=True, scale=2.0))
    _check_forward_backward(
        lambda q, k, v, sinks: ops.sliding_window_attention(q, k, v, 6, bottom_right=True, sinks=sinks),
        lambda q, k, v, sinks: S.oracle(q, k, v, causal=True, bottom_right=True, window=6, sinks=sinks), inputs)


@pytest.mark.parametrize("window", [0, 6])
def test_paged_sinks(path, window):
    """Decode with sinks, with and without a window; lengths not multiples of the block."""
    pool_k, table, lens = _paged_inputs([37, 50, 5], block=8, kv_heads=2, dqk=16, num_blocks=32)
    pool_v = torch.randn_like(pool_k)
    q, sinks = torch.randn(3, 4, 1, 16), torch.randn(4) * 2
    out = ops.paged_attention(q, pool_k, pool_v, table, lens, window=window, sinks=sinks)
    want = _paged_oracle(q, pool_k, pool_v, table, lens, scale=0.25, window=window, sinks=sinks)
    S.assert_op_close(out, want, F32, "out")


def test_sinks_bf16_parameter(path):
    """GPT-OSS keeps its sinks in the model dtype: a bf16 [Hq] tensor with bf16 q/k/v; its gradient is bf16."""
    dtype = torch.bfloat16
    inputs = dict(q=_randn(2, 4, 37, 16, dtype=dtype, requires_grad=True),
                  k=_randn(2, 2, 37, 16, dtype=dtype, requires_grad=True),
                  v=_randn(2, 2, 37, 16, dtype=dtype, requires_grad=True),
                  sinks=_randn(4, dtype=dtype, requires_grad=True))
    _check_forward_backward(lambda q, k, v, sinks: ops.flash_attention(q, k, v, causal=True, sinks=sinks),
                            lambda q, k, v, sinks: S.oracle(q, k, v, causal=True, sinks=sinks), inputs, dtype=dtype)
    assert inputs["sinks"].grad.dtype == dtype


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(2), r"sinks.*\[Hq\]=\[4\].*got \[2\]"),            # one per KV head is not enough
    (torch.zeros(1, 4), r"sinks.*\[Hq\]=\[4\].*got \[1, 4\]"),
    (torch.zeros(4, dtype=torch.int64), r"sinks.*float"),
])
def test_sinks_validation(bad, match):
    q, k, v = _randn(2, 4, 5, 16), _randn(2, 2, 5, 16), _randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match=match):
        ops.flash_attention(q, k, v, sinks=bad)


def test_opcheck_sinks():
    q, k, v = _randn(2, 4, 9, 16, requires_grad=True), _randn(2, 2, 11, 16, requires_grad=True), \
        _randn(2, 2, 11, 16, requires_grad=True)
    sinks = _randn(4, requires_grad=True)
    opcheck(OPS.flash_attention, (q, k, v), dict(causal=True, bottom_right=True, sinks=sinks))
    opcheck(OPS.sliding_window_attention, (q, k, v, 3), dict(sinks=sinks))
    pool, table, lens = _paged_inputs([10, 6], block=4, kv_heads=2, dqk=16, num_blocks=8)
    opcheck(OPS.paged_attention, (torch.randn(2, 4, 1, 16), pool, pool.clone(), table, lens), dict(sinks=sinks.detach()))


# ==============================================================================================
# 3. document mode (packed sequences)

LAYOUTS = {
    "mixed": [[5, 9, 3, 12, 8], [20, 17]],
    "singletons": [[1, 1, 1, 1, 1, 32], [36, 1]],
    "one_doc": [[37], [37]],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flash_documents(path, layout, causal):
    """doc_ids int32 [B, T]: key j visible from query i only within i's document (and causal)."""
    doc_ids = S.doc_ids_from_lengths(LAYOUTS[layout])
    inputs = dict(q=_randn(2, 4, 37, 16, requires_grad=True), k=_randn(2, 2, 37, 16, requires_grad=True),
                  v=_randn(2, 2, 37, 24, requires_grad=True))
    _check_forward_backward(lambda q, k, v: ops.flash_attention(q, k, v, causal=causal, doc_ids=doc_ids),
                            lambda q, k, v: S.oracle(q, k, v, causal=causal, doc_ids=doc_ids), inputs)


def test_documents_int64_and_broadcast_batch(path):
    """HF hands position-derived ids as int64; one [1, T] row of ids may serve the whole batch."""
    doc_ids = S.doc_ids_from_lengths([[5, 9, 3, 12, 8]]).long()
    inputs = dict(q=_randn(2, 4, 37, 16, requires_grad=True), k=_randn(2, 4, 37, 16, requires_grad=True),
                  v=_randn(2, 4, 37, 16, requires_grad=True))
    _check_forward_backward(lambda q, k, v: ops.flash_attention(q, k, v, causal=True, doc_ids=doc_ids),
                            lambda q, k, v: S.oracle(q, k, v, causal=True, doc_ids=doc_ids), inputs)


def test_documents_unsorted_ids_stay_exact(path):
    """Ids that are not runs (0 1 0 2 1 ...) still mean `doc[i] == doc[j]`: block skipping may not
    assume contiguous documents it cannot see (the op stays exact, only slower)."""
    doc_ids = torch.randint(0, 3, (2, 37), dtype=torch.int32)
    inputs = dict(q=_randn(2, 4, 37, 16, requires_grad=True), k=_randn(2, 4, 37, 16, requires_grad=True),
                  v=_randn(2, 4, 37, 16, requires_grad=True))
    _check_forward_backward(lambda q, k, v: ops.flash_attention(q, k, v, doc_ids=doc_ids),
                            lambda q, k, v: S.oracle(q, k, v, doc_ids=doc_ids), inputs)


def test_documents_bottom_right(path):
    """Tq < Tk (a chunk of a packed row after a prefix): query i is key position i + Tk - Tq, its document
    doc_ids[b, i + Tk - Tq]."""
    doc_ids = S.doc_ids_from_lengths([[5, 9, 3, 12, 8], [20, 17]])
    inputs = dict(q=_randn(2, 4, 13, 16, requires_grad=True), k=_randn(2, 2, 37, 16, requires_grad=True),
                  v=_randn(2, 2, 37, 16, requires_grad=True))
    _check_forward_backward(
        lambda q, k, v: ops.flash_attention(q, k, v, causal=True, bottom_right=True, doc_ids=doc_ids),
        lambda q, k, v: S.oracle(q, k, v, causal=True, bottom_right=True, doc_ids=doc_ids), inputs)


def test_sliding_documents(path):
    doc_ids = S.doc_ids_from_lengths([[5, 9, 3, 12, 8], [20, 17]])
    inputs = dict(q=_randn(2, 4, 37, 16, requires_grad=True), k=_randn(2, 2, 37, 16, requires_grad=True),
                  v=_randn(2, 2, 37, 16, requires_grad=True))
    _check_forward_backward(lambda q, k, v: ops.sliding_window_attention(q, k, v, 4, doc_ids=doc_ids),
                            lambda q, k, v: S.oracle(q, k, v, causal=True, window=4, doc_ids=doc_ids), inputs)


def test_documents_with_padding_bias_and_sinks(path):
    """Every feature at once (GPT-OSS trained on packed rows with right padding): documents, a bool
    padding bias, sinks, a value head dim of its own."""
    doc_ids = S.doc_ids_from_lengths([[5, 9, 3, 12, 8], [20, 17]])
    keep = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    keep[1, ..., 30:] = False
    inputs = dict(q=_randn(2, 4, 37, 24, requires_grad=True), k=_randn(2, 2, 37, 24, requires_grad=True),
                  v=_randn(2, 2, 37, 16, requires_grad=True), sinks=_randn(4, requires_grad=True))
    _check_forward_backward(
        lambda q, k, v, sinks: ops.flash_attention(q, k, v, keep, causal=True, sinks=sinks, doc_ids=doc_ids),
        lambda q, k, v, sinks: S.oracle(q, k, v, bias=keep, causal=True, sinks=sinks, doc_ids=doc_ids), inputs)


# Documents of 128 tokens: every tile the kernels use (16 under the interpreter, up to 128 on a GPU)
# holds keys of one document only, so a tile of another document is never needed.
SKIP_DOC = 128


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_kernels_skip_blocks_of_other_documents(monkeypatch, causal):
    """The Triton kernels visit no tile in which no query shares a document with any key, forward and
    backward: keys and values of document 1 are NaN (and so is the output gradient of its rows), yet
    documents 0 and 2 come out finite and exact. A kernel that multiplies a skipped tile by zero
    instead of skipping it gets 0 * NaN = NaN."""
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    t = 3 * SKIP_DOC
    doc_ids = S.doc_ids_from_lengths([[SKIP_DOC] * 3])
    other = slice(SKIP_DOC, 2 * SKIP_DOC)
    clean = dict(q=torch.randn(1, 2, t, 16), k=torch.randn(1, 2, t, 16), v=torch.randn(1, 2, t, 16))
    poisoned = {n: x.clone() for n, x in clean.items()}
    poisoned["k"][:, :, other] = math.nan
    poisoned["v"][:, :, other] = math.nan
    for x in poisoned.values():
        x.requires_grad_(True)
    out = ops.flash_attention(poisoned["q"], poisoned["k"], poisoned["v"], causal=causal, doc_ids=doc_ids)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grad_out[:, :, other] = math.nan
    out.backward(grad_out.float())

    ref = {n: x.double().requires_grad_(True) for n, x in clean.items()}
    want, _ = S.oracle(ref["q"], ref["k"], ref["v"], causal=causal, doc_ids=doc_ids)
    (want * grad_out.nan_to_num(0.0)).sum().backward()
    keep = torch.ones(t, dtype=torch.bool)
    keep[other] = False
    S.assert_op_close(out[:, :, keep], want[:, :, keep], F32, "out (documents 0 and 2)")
    for n in ("q", "k", "v"):
        S.assert_op_close(poisoned[n].grad[:, :, keep], ref[n].grad[:, :, keep], F32, f"d{n} (documents 0 and 2)",
                          backward=True)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(2, 36, dtype=torch.int32), r"doc_ids.*\[B, Tk\]=\[2, 37\].*got \[2, 36\]"),
    (torch.zeros(2, 1, 37, dtype=torch.int32), r"doc_ids.*\[B, Tk\]"),
    (torch.zeros(2, 37), r"doc_ids.*int32 or int64"),
])
def test_doc_ids_validation(bad, match):
    q, k, v = _randn(2, 4, 37, 16), _randn(2, 2, 37, 16), _randn(2, 2, 37, 16)
    with pytest.raises(ValueError, match=match):
        ops.flash_attention(q, k, v, doc_ids=bad)


def test_opcheck_documents():
    q, k, v = _randn(2, 4, 37, 16, requires_grad=True), _randn(2, 2, 37, 16, requires_grad=True), \
        _randn(2, 2, 37, 16, requires_grad=True)
    doc_ids = S.doc_ids_from_lengths(LAYOUTS["mixed"])
    opcheck(OPS.flash_attention, (q, k, v), dict(causal=True, doc_ids=doc_ids))
    opcheck(OPS.sliding_window_attention, (q, k, v, 4), dict(doc_ids=doc_ids, sinks=torch.zeros(4)))


# ---- document ids from what models and collators hand over: on the device, no host sync

def test_doc_ids_from_position_ids_matches_hf():
    """Boundaries where positions do not step by one, exactly as HF's eager / sdpa masks place them
    (masking_utils.find_packed_sequence_indices), so the mask they build is what document mode computes."""
    from transformers.masking_utils import find_packed_sequence_indices

    position_ids = torch.cat([S.position_ids_from_lengths([[5, 9, 3, 12, 8]]),
                              torch.tensor([[3, 4, 5, 0, 1, 0, 7, 8, 9, 10] + list(range(27))])])
    got = ops.doc_ids_from_position_ids(position_ids)
    assert got.shape == position_ids.shape and got.dtype in (torch.int32, torch.int64)
    assert S.same_partition(got, find_packed_sequence_indices(position_ids))


def test_doc_ids_from_cu_seqlens():
    """flash-attn varlen offsets -> ids of one packed row [1, total]."""
    lengths = [5, 9, 3, 12, 8]
    got = ops.doc_ids_from_cu_seqlens(S.cu_seqlens_from_lengths(lengths), sum(lengths))
    assert got.shape == (1, sum(lengths))
    assert S.same_partition(got, S.doc_ids_from_lengths([lengths]))


def test_doc_id_helpers_and_op_are_graph_safe():
    """Ids derived from positions and the op with documents trace without reading data: under
    FakeTensorMode (a host read raises there) and under torch.compile(fullgraph=True)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    position_ids = S.position_ids_from_lengths([[5, 9, 3, 12, 8]])
    q, k, v = _randn(1, 4, 37, 16), _randn(1, 2, 37, 16), _randn(1, 2, 37, 16)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv, fpos = (mode.from_tensor(x) for x in (q, k, v, position_ids))
        out = ops.flash_attention(fq, fk, fv, causal=True, doc_ids=ops.doc_ids_from_position_ids(fpos))
        assert out.shape == (1, 4, 37, 16)

    def step(q, k, v, position_ids):
        return ops.flash_attention(q, k, v, causal=True, doc_ids=ops.doc_ids_from_position_ids(position_ids))

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, position_ids)
    want, _ = S.oracle(q, k, v, causal=True, doc_ids=S.doc_ids_from_lengths([[5, 9, 3, 12, 8]]))
    S.assert_op_close(got, want, F32, "out")


# ==============================================================================================
# on a GPU: no host sync, and a captured CUDA graph replays new data (sinks, documents)

@pytest.mark.gpu
def test_new_arguments_never_sync_and_replay_in_a_cuda_graph():
    """Forward and backward with Dv != Dqk, sinks and doc_ids run with CUDA sync debugging set to
    "error"; a CUDA graph captured once replays a different packing (new doc_ids copied into the
    captured tensor) and new sinks correctly: the block ranges are data, computed on the device."""
    dev = "cuda"
    q = torch.randn(2, 8, 300, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 300, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 300, 48, device=dev, dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(8, device=dev, requires_grad=True)
    doc_ids = S.doc_ids_from_lengths([[100, 37, 163], [1, 299]]).to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.flash_attention(q, k, v, causal=True, sinks=sinks, doc_ids=doc_ids)
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    static = [x.detach().clone() for x in (q, k, v)]
    static_sinks, static_docs = sinks.detach().clone(), doc_ids.clone()
    ops.flash_attention(*static, causal=True, sinks=static_sinks, doc_ids=static_docs)  # warm up (compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.flash_attention(*static, causal=True, sinks=static_sinks, doc_ids=static_docs)
    for lengths in ([[300], [150, 150]], [[7, 93, 200], [299, 1]]):
        new_docs = S.doc_ids_from_lengths(lengths).to(dev)
        static_docs.copy_(new_docs)
        static_sinks.copy_(torch.randn(8, device=dev))
        graph.replay()
        want, _ = S.oracle(*static, causal=True, sinks=static_sinks, doc_ids=new_docs)
        S.assert_op_close(static_out, want, torch.bfloat16, f"replay with documents {lengths}")
