"""Inductor's own attention fusion is off inside attnlower graphs and untouched outside them."""
import torch
import torch.nn.functional as F

from attnlower.compiler.inductor import _is_sfdp, without_sfdp


def _sfdp_count() -> int:
    from torch._inductor.fx_passes import joint_graph

    tables = [joint_graph.patterns, joint_graph.early_patterns, *joint_graph.pass_patterns]
    return sum(_is_sfdp(e) for t in tables for entries in t.patterns.values() for e in entries)


def _softmax_over_queries(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-2) @ v


def test_without_sfdp_strips_and_restores():
    from torch._inductor.fx_passes import joint_graph

    joint_graph.lazy_init(torch.device("cpu"))
    before = _sfdp_count()
    assert before > 0, "torch registered no fuse_attention patterns: _is_sfdp no longer recognizes them"
    with without_sfdp():
        assert _sfdp_count() == 0
    assert _sfdp_count() == before


def test_refused_softmax_keeps_its_numbers_under_inductor():
    """softmax over dim -2 is refused by attnlower; Inductor must not turn it into SDPA behind our back."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=torch.float32) for _ in range(3))
    expected = _softmax_over_queries(q, k, v)
    out = torch.compile(_softmax_over_queries, backend="attnlower")(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
