"""Document mode (issue 21.3) beyond tests/lowering/test_features_issue21.py: the device-side bounds
(lowering/documents.py), documents combined with the other features (fill, dropout, Dv != Dqk, GQA, half
precision, a window), and block skipping with documents that do not start on tile edges. Float64 oracle of
attention_oracle.py, fresh inputs, every output buffer poisoned (NaN) before the launch.
"""
from __future__ import annotations

import math

import pytest
import torch

import attnlower.ops as public
from attnlower.lowering.launch import document_bounds, flash_backward, flash_forward
from attnlower.lowering.params import AttentionParams

from attention_oracle import TOLERANCES, oracle  # sibling helper; pytest puts tests/lowering on sys.path

OPS = torch.ops.attnlower
pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def ids(*rows) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).to(torch.int32)


def test_document_bounds():
    """Each position's run [start, end); rows whose ids decrease anywhere get [0, Tk) (no skipping)."""
    got = document_bounds(torch.tensor([[0, 0, 1, 1, 1, 4], [3, 3, 3, 3, 3, 3], [0, 1, 0, 2, 2, 2]]))
    assert got.dtype == torch.int32 and got.shape == (3, 2, 6)
    assert got[0].tolist() == [[0, 0, 2, 2, 2, 5], [2, 2, 5, 5, 5, 6]]
    assert got[1].tolist() == [[0] * 6, [6] * 6]
    assert got[2].tolist() == [[0] * 6, [6] * 6]
    assert document_bounds(torch.tensor([[7]], dtype=torch.int64)).tolist() == [[[0], [1]]]


def _runs(row: list[int]) -> list[list[int]]:
    """[starts, ends] of each position's run of equal values, by a plain walk; [0, n) everywhere if it ever decreases."""
    n = len(row)
    if any(b < a for a, b in zip(row, row[1:])):
        return [[0] * n, [n] * n]
    starts = [next(i for i in range(j, -1, -1) if i == 0 or row[i - 1] != row[j]) for j in range(n)]
    ends = [next(i for i in range(j, n + 1) if i == n or row[i] != row[j]) for j in range(n)]
    return [starts, ends]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_document_bounds_rows_longer_than_a_program_and_strided(dtype, monkeypatch):
    """Rows spanning several programs (the block shrunk to 16 positions so the interpreter sees 5 of them): runs
    crossing program edges, a descent in the last program only (every program must see it), strided ids."""
    from attnlower.lowering import launch

    monkeypatch.setattr(launch, "_DOC_BOUNDS_BLOCK", 16)
    torch.manual_seed(0)
    sorted_row = torch.sort(torch.randint(0, 9, (70,))).values
    late_descent = sorted_row.clone()
    late_descent[66] = -1
    wide = torch.stack([sorted_row, late_descent, torch.zeros(70, dtype=torch.int64)]).to(dtype)
    strided = torch.zeros(3, 140, dtype=dtype)
    strided[:, ::2] = wide
    for doc_ids in (wide, strided[:, ::2]):
        got = document_bounds(doc_ids)
        assert got.shape == (3, 2, 70) and got.dtype == torch.int32
        for b in range(3):
            assert got[b].tolist() == _runs(wide[b].tolist()), b


def _check(run, inputs, oracle_kw, dtype=torch.float32):
    out, lse = run(**inputs)
    leaves = {n: t.detach().double().requires_grad_() for n, t in inputs.items() if t.requires_grad}
    want, want_lse = oracle(leaves["q"], leaves["k"], leaves["v"], sinks=leaves.get("sinks"), **oracle_kw)
    (fa, fr), (ba, br) = TOLERANCES[dtype]
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want.detach(), atol=fa, rtol=fr)
    torch.testing.assert_close(lse.double(), want_lse.detach(), atol=fa, rtol=fr)
    w = torch.randn(out.shape, dtype=torch.float64)
    names = list(leaves)
    got = torch.autograd.grad((out.double() * w).sum(), [inputs[n] for n in names])
    ref = torch.autograd.grad((want * w).sum(), [leaves[n] for n in names])
    for n, g, r in zip(names, got, ref):
        torch.testing.assert_close(g.double(), r, atol=ba, rtol=br, msg=lambda m: f"d{n}: {m}")


def _qkv(b, hq, hkv, tq, tk, d, dv=None, dtype=torch.float32):
    return dict(q=torch.randn(b, hq, tq, d, dtype=dtype, requires_grad=True),
                k=torch.randn(b, hkv, tk, d, dtype=dtype, requires_grad=True),
                v=torch.randn(b, hkv, tk, dv or d, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("fill", [-1e9, -2.0])
def test_documents_with_fill(path, fill):
    """Pairs of two documents are masked too, so in fill mode they take the fill: -2 weighs every other document's
    keys (the kernels visit the skipped blocks), -1e9 none."""
    doc_ids = ids([5, 20, 12], [37])
    _check(lambda q, k, v: OPS.flash_attention(q, k, v, causal=True, doc_ids=doc_ids, fill=fill)[:2],
           _qkv(2, 4, 2, 37, 37, 16), dict(causal=True, doc_ids=doc_ids, fill=fill))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_documents_half_precision_value_dim_window(path, dtype):
    doc_ids = ids([9, 1, 27], [18, 19])
    inputs = _qkv(2, 6, 2, 37, 37, 24, dv=40, dtype=dtype)
    _check(lambda q, k, v: OPS.sliding_window_attention(q, k, v, 11, doc_ids=doc_ids)[:2], inputs,
           dict(causal=True, window=11, doc_ids=doc_ids), dtype=dtype)


def test_documents_bottom_right_with_sinks_and_a_batch_wide_row(path):
    """[1, Tk] ids for the batch, Tq < Tk bottom-right, sinks: rows take the ids of the last Tq key positions."""
    doc_ids = ids([3, 17, 4, 13])
    inputs = _qkv(2, 4, 4, 21, 37, 16)
    inputs["sinks"] = torch.randn(4, requires_grad=True)
    _check(lambda q, k, v, sinks: OPS.flash_attention(q, k, v, causal=True, bottom_right=True, sinks=sinks,
                                                      doc_ids=doc_ids)[:2],
           inputs, dict(causal=True, bottom_right=True, doc_ids=doc_ids))


def test_documents_with_negative_and_repeated_unsorted_ids(path):
    """Ids that repeat after another document and are negative: exact (no skipping on that row)."""
    doc_ids = torch.tensor([[-3] * 10 + [5] * 10 + [-3] * 10 + [0] * 7, list(range(37))], dtype=torch.int64)
    _check(lambda q, k, v: OPS.flash_attention(q, k, v, doc_ids=doc_ids)[:2], _qkv(2, 2, 2, 37, 37, 16),
           dict(doc_ids=doc_ids))


def test_documents_dropout_kernels():
    """Dropout with documents: the mask read back through v = identity, then every gradient against the oracle."""
    torch.manual_seed(4)
    dropout_p = 0.25
    doc_ids = ids([11, 3, 18])
    q, k = torch.randn(1, 2, 32, 32), torch.randn(1, 1, 32, 32)
    rng = torch.tensor([5, 1 << 9], dtype=torch.int64)
    params = AttentionParams(0.5, True, dropout_p=dropout_p)
    eye = torch.eye(32).expand(1, 1, 32, 32)
    probe, _ = flash_forward(q, k, eye, params, rng_state=rng, doc_ids=doc_ids)
    p, _ = oracle(q, k, eye, scale=0.5, causal=True, doc_ids=doc_ids)
    keep = probe != 0
    torch.testing.assert_close(probe[keep].double(), p[keep] / (1 - dropout_p), atol=1e-6, rtol=1e-5)
    v = torch.randn(1, 1, 32, 32)
    out, lse = flash_forward(q, k, v, params, rng_state=rng, doc_ids=doc_ids)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want, _ = oracle(*leaves, scale=0.5, causal=True, doc_ids=doc_ids, keep=keep, dropout_p=dropout_p)
    torch.testing.assert_close(out.double(), want.detach(), atol=2e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, params, rng_state=rng, doc_ids=doc_ids)
    want.backward(grad_out.double())
    for got, leaf in zip(grads[:3], leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=5e-5, rtol=1e-5)


def test_skipping_with_documents_off_the_tile_edges(monkeypatch):
    """Documents of 21 / 43 / 40 tokens (edges inside 16-key tiles), causal: keys and values of the one tile inside
    the middle document are NaN. No query tile of the other documents may visit it (forward and dQ; a query tile
    straddling documents 0 and 1 stops at its causal edge, one of document 2 starts at its document), so they come
    out exact with dq; dk / dv too for the keys whose 16-key tile holds no key of the middle document (the dK/dV
    kernel visits the rows of every document in its tile, and the NaN rows of the middle document reach a tile it
    shares with document 0 as 0 * NaN through delta = rowsum(dO * O): a visit, not a skip)."""
    if torch.get_default_device().type != "cpu":
        # measured on an H200 (2026-12-03): the GPU's tiles (32 / 64 / 128 keys) straddle the middle document, so
        # its NaN tile is visited (masked, 0 * NaN) and the premise below does not hold there; the GPU runs the
        # other document tests against the oracle
        pytest.skip("the premise is the interpreter's 16-key tiles")
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    lengths = [21, 43, 40]
    doc_ids = ids(lengths)
    t = sum(lengths)
    middle = torch.zeros(t, dtype=torch.bool)
    middle[21:64] = True
    inner = torch.zeros(t, dtype=torch.bool)
    inner[32:48] = True          # the one 16-token tile inside the middle document
    clean = dict(q=torch.randn(1, 2, t, 16), k=torch.randn(1, 2, t, 16), v=torch.randn(1, 2, t, 16))
    poisoned = {n: x.clone() for n, x in clean.items()}
    poisoned["k"][:, :, inner] = math.nan
    poisoned["v"][:, :, inner] = math.nan
    for x in poisoned.values():
        x.requires_grad_(True)
    out = public.flash_attention(poisoned["q"], poisoned["k"], poisoned["v"], causal=True, doc_ids=doc_ids)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grad_out[:, :, middle] = 0.0
    out.backward(grad_out.float())
    ref = {n: x.double().requires_grad_(True) for n, x in clean.items()}
    want, _ = oracle(ref["q"], ref["k"], ref["v"], causal=True, doc_ids=doc_ids)
    (want * grad_out).sum().backward()
    keep = ~middle
    keys = keep.clone()
    keys[16:64] = False          # key tiles holding part of the middle document
    torch.testing.assert_close(out[:, :, keep].double(), want[:, :, keep].detach(), atol=2e-5, rtol=1e-5)
    for n, rows in (("q", keep), ("k", keys), ("v", keys)):
        torch.testing.assert_close(poisoned[n].grad[:, :, rows].double(), ref[n].grad[:, :, rows],
                                   atol=5e-5, rtol=1e-5, msg=lambda m: f"d{n}: {m}")


TRACE_BODY = """
def fn(q, k, v, mask, sinks, position_ids, verified):
    return public.flash_attention(q, k, v, mask, causal=True, sinks=sinks, fill=-1e9, verified=verified,
                                  doc_ids=public.doc_ids_from_position_ids(position_ids))

q, k = torch.randn(1, 4, 20, 24), torch.randn(1, 2, 20, 24)
v = torch.randn(1, 2, 20, 16)
args = (q, k, v, torch.ones(20, 20, dtype=torch.bool).tril(), torch.randn(4),
        torch.tensor([list(range(8)) + list(range(12))]), torch.tensor(True))
"""


def test_new_arguments_trace_into_the_kernel_launch():
    """Under AOTAutograd the op with sinks, documents, a fill, a verified flag and Dv != Dqk decomposes into its
    Triton launches (Inductor would launch them itself), the document bounds' kernel first: no opaque op, no host read
    (fullgraph=True)."""
    from traced_launches import aot_targets   # sibling helper (tests/lowering is on sys.path)

    targets = aot_targets(TRACE_BODY)
    assert "triton_kernel_wrapper_functional:_flash_fwd_kernel" in targets, targets
    assert "triton_kernel_wrapper_functional:_doc_bounds_kernel" in targets, targets   # the bounds, on the device
    assert targets.index("triton_kernel_wrapper_functional:_doc_bounds_kernel") < \
        targets.index("triton_kernel_wrapper_functional:_flash_fwd_kernel"), targets
    assert not any(t.startswith("attnlower.") for t in targets), targets
