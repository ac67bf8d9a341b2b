"""Issue 21, part 3: packed sequences (several documents in one row, causal within a document, nothing
across documents).

Compiled with `backend="attnlower"` (strict) == eager, forward and gradients, and the report shows
document mode: the op gets the documents as `doc_ids` (`Site.spec["documents"]`, `"document"` in
`Site.mask`), the mask is *not* passed as a dense bias (`bias_kind == "none"`), causal / the window are
the kernel's own. Spellings: FlexAttention's document-mask example spelled densely (`doc[:, None] ==
doc[None, :]`), positions restarting at 0 by hand, flash-attn `cu_seqlens` offsets, a packed
bidirectional encoder, a window within documents, HF Llama / Mistral eager and sdpa fed by
`DataCollatorWithFlattening` (position_ids restarting per document), varying packed lengths under
dynamic shapes; a negative that is not document masking. `attn_implementation="attnlower"` on packed
inputs the way HF's flash-attention path takes them (boundaries from position_ids).
Interface: docs/design/issue21.md.
"""
from __future__ import annotations

import pytest
import torch

import spellings_issue21 as S

B, HQ, HKV, T, D = 2, 4, 2, 37, 16
ROWS = [[5, 9, 3, 12, 8], [20, 17]]          # per-row document lengths, 37 tokens each


def _qkv(hkv=HQ, t=T):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, h, t, D, generator=g).requires_grad_() for h in (HQ, hkv, hkv)]


def _document_mode(site, op="flash_attention", causal=True, window=0):
    assert site.op == op, f"expected {op}, got {site.op or 'unfused'}: {site.reason}"
    assert site.spec.get("documents") is True, f"not document mode (doc_ids not passed): {site.spec}"
    assert "document" in site.mask, f"the mask was not classified as documents: {site.mask!r} ({site.reason})"
    assert site.spec["bias_kind"] == "none", f"the document mask went in as a dense bias: {site.spec}"
    assert site.spec["causal"] == causal and site.spec["window"] == window, site.spec


@pytest.mark.parametrize("inner", S.INNERS)
def test_flex_document_mask(inner):
    """FlexAttention's example: document_id [T] shared by the batch, causal & same document, SDPA."""
    q, k, v = _qkv()
    document_id = S.doc_ids_from_lengths([ROWS[0]])[0].long()
    reports = S.check_compiled_matches_eager(S.flex_document_causal, q, k, v, document_id, inner=inner,
                                             grad_of=dict(q=q, k=k, v=v))
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _document_mode(site)


def test_restarting_positions():
    q, k, v = _qkv()
    position_ids = S.position_ids_from_lengths(ROWS)
    reports = S.check_compiled_matches_eager(S.restarting_positions, q, k, v, position_ids,
                                             grad_of=dict(q=q, k=k, v=v))
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _document_mode(site)


def test_cu_seqlens_offsets():
    q, k, v = _qkv()
    cu_seqlens = S.cu_seqlens_from_lengths(ROWS[0])
    reports = S.check_compiled_matches_eager(S.cu_seqlens_offsets, q, k, v, cu_seqlens, grad_of=dict(q=q, k=k, v=v))
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _document_mode(site)


def test_packed_encoder():
    """Bidirectional within each document (no causal): document mode without causal."""
    q, k, v = _qkv()
    reports = S.check_compiled_matches_eager(S.packed_encoder, q, k, v, S.doc_ids_from_lengths(ROWS),
                                             grad_of=dict(q=q, k=k, v=v))
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _document_mode(site, causal=False)


def test_packed_sliding_window():
    q, k, v = _qkv()
    reports = S.check_compiled_matches_eager(S.packed_sliding(4), q, k, v, S.doc_ids_from_lengths(ROWS),
                                             grad_of=dict(q=q, k=k, v=v))
    (site,) = S.fused_sites(reports, "sliding_window_attention", 1)
    _document_mode(site, op="sliding_window_attention", window=4)


def test_packed_lengths_vary_without_recompiling():
    """Training batches pack to different totals: dynamic=True, three packings, one graph, each equal to eager."""
    from attnlower.compiler.backend import attnlower_backend

    packings = [[[5, 9, 3, 12, 8], [20, 17]], [[1, 22], [13, 10]], [[40, 1, 8], [49]]]
    q, k, v = _qkv()
    _, reports = S.compile_and_run(S.restarting_positions, q, k, v, S.position_ids_from_lengths(packings[0]),
                                   dynamic=True)
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    _document_mode(site)

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs, **kw):
        graphs.append(gm)
        return attnlower_backend(gm, example_inputs, **kw)

    compiled = torch.compile(S.restarting_positions, backend=counting, dynamic=True,
                             options={"inner": "eager", "strict": True})
    for rows in packings:
        t = sum(rows[0])
        q, k, v = (x.detach() for x in _qkv(t=t))
        position_ids = S.position_ids_from_lengths(rows)
        S.assert_close(compiled(q, k, v, position_ids), S.restarting_positions(q, k, v, position_ids),
                       S.RTOL[torch.float32], what=f"T={t}")
    assert len(graphs) == 1, f"{len(graphs)} compiles for 3 packings"


# ----------------------------------------------------------------------------------------------
# Hugging Face, packed by DataCollatorWithFlattening (one row, position_ids restarting per document)

# HF's eager / sdpa masks pack documents only when there is no cache (masking_utils
# `_preprocess_mask_arguments`): every packed call here passes use_cache=False, as training does.
def _hf_packed_cases():
    for name in ("llama", "mistral"):
        for impl in ("eager", "sdpa"):
            yield pytest.param(name, impl, "eager", id=f"{name}-{impl}-eager")
    yield pytest.param("llama", "sdpa", "inductor", id="llama-sdpa-inductor")


@pytest.mark.parametrize("name,impl,inner", list(_hf_packed_cases()))
def test_hf_packed(name, impl, inner):
    """HF builds a block-diagonal causal mask from the restarting position_ids (remapped causal AND same
    packed sequence); it must become document mode, Mistral's window kept (7 < the 9 and 12 documents)."""
    model = S.hf_causal_lm(name, impl)
    batch = S.packed_hf_batch()
    fn = lambda input_ids, position_ids: model(input_ids=input_ids, position_ids=position_ids,  # noqa: E731
                                               use_cache=False).logits
    reports = S.check_compiled_matches_eager(fn, batch["input_ids"], batch["position_ids"], inner=inner)
    op = "sliding_window_attention" if name == "mistral" else "flash_attention"
    for site in S.fused_sites(reports, op, 2):
        _document_mode(site, op=op, window=7 if name == "mistral" else 0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_packed_backward(impl):
    """Packed training step: the gradients of every attention weight equal eager's."""
    model = S.hf_causal_lm("llama", impl).train()
    batch = S.packed_hf_batch()
    params = {n: p for n, p in model.named_parameters() if "self_attn" in n}
    fn = lambda input_ids, position_ids: model(input_ids=input_ids, position_ids=position_ids,  # noqa: E731
                                               use_cache=False).logits
    reports = S.check_compiled_matches_eager(fn, batch["input_ids"], batch["position_ids"], grad_of=params)
    for site in S.fused_sites(reports, "flash_attention", 2):
        _document_mode(site)


# ----------------------------------------------------------------------------------------------
# attn_implementation="attnlower" on packed inputs

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for name in ("llama", "mistral"):
        paths[name] = tmp_path_factory.mktemp(name)
        S.hf_causal_lm(name, "eager").save_pretrained(paths[name])
    return paths


def _load(checkpoints, name, impl):
    import transformers

    cls = transformers.LlamaForCausalLM if name == "llama" else transformers.MistralForCausalLM
    return cls.from_pretrained(checkpoints[name], attn_implementation=impl, dtype=torch.float32).train()


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_attn_implementation_attnlower_packed(checkpoints, monkeypatch, name):
    """As HF's flash-attention path: document boundaries from position_ids (computed on the device),
    no [B, 1, T, T] mask handed to the op; every layer's call carries doc_ids splitting the row into
    the collator's documents; loss, logits and every gradient equal eager attention's."""
    batch = S.packed_hf_batch()
    want_docs = S.doc_ids_from_lengths([[5, 9, 3, 12]])
    results = {}
    for impl in ("eager", "attnlower"):
        model = _load(checkpoints, name, impl)
        calls = S.record_calls(monkeypatch, "flash_attention", "sliding_window_attention") if impl == "attnlower" else []
        out = model(**batch, use_cache=False)   # HF packs eager / sdpa masks only without a cache
        out.loss.backward()
        results[impl] = out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}
        if impl == "attnlower":
            assert len(calls) == 2, [c[0] for c in calls]
            for op, args, kw in calls:
                bias = args[4] if op == "sliding_window_attention" and len(args) > 4 else (
                    args[3] if op == "flash_attention" and len(args) > 3 else kw.get("bias"))
                assert bias is None, f"{op} got a dense [B, 1, T, T] mask: the packed rows were not document mode"
                docs = kw.get("doc_ids")
                assert docs is not None and S.same_partition(docs, want_docs), f"{op} doc_ids: {docs}"
                if name == "mistral":
                    assert op == "sliding_window_attention" and args[3] == 7, (op, args[3:4])
    torch.testing.assert_close(results["attnlower"][0], results["eager"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results["attnlower"][1], results["eager"][1], rtol=1e-5, atol=1e-6)
    for param, want in results["eager"][2].items():
        torch.testing.assert_close(results["attnlower"][2][param], want, rtol=1e-4, atol=1e-5, msg=param)


def test_attn_implementation_attnlower_padding_is_not_packing(checkpoints, monkeypatch):
    """A padded batch with generate-style position_ids (pads at 1, then 0, 1, 2, ...) is padding, not
    packing: HF builds no packed mask when a 2-D attention_mask is given, and neither may attnlower
    split the row by its position_ids (parity with eager on the real tokens)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (B, 24), generator=g)
    mask = torch.ones(B, 24, dtype=torch.long)
    mask[0, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    outs = {}
    for impl in ("eager", "attnlower"):
        model = _load(checkpoints, "llama", impl).eval()
        calls = S.record_calls(monkeypatch, "flash_attention") if impl == "attnlower" else []
        with torch.no_grad():
            outs[impl] = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        assert all(c[2].get("doc_ids") is None for c in calls), "padding was taken for packed documents"
    keep = mask.bool()
    torch.testing.assert_close(outs["attnlower"][keep], outs["eager"][keep], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# negative

def test_cross_document_mask_is_not_document_mode():
    """`doc[i] != doc[j]` (plus the diagonal) is a data mask, not document masking: it stays a bias."""
    q, k, v = (x.detach() for x in _qkv())
    docs = S.doc_ids_from_lengths(ROWS)
    want = S.cross_documents_only(q, k, v, docs)
    got, reports = S.compile_and_run(S.cross_documents_only, q, k, v, docs)
    S.assert_close(got, want, S.RTOL[torch.float32])
    (site,) = S.fused_sites(reports, "flash_attention", 1)
    assert not site.spec.get("documents") and site.spec["bias_kind"] == "bool", site.spec
