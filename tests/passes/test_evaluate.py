"""How validation evaluates (passes/evaluate.py): the comparison's rules, and SDPA by its math definition.

`sdpa_reference` is torch's SDPA where torch is right (every input one dtype) and stays right where
torch's CPU kernel is not (float64 q/k/v with a float32 mask).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlower.passes import evaluate as E


def test_compare_rules():
    a = torch.tensor([[1.0, 2.0], [float("nan"), float("nan")]], dtype=torch.float64)
    assert E.compare(a, a.clone()) == ""
    assert "NaN pattern differs" in E.compare(a, torch.nan_to_num(a))
    assert "max abs error 0.5" in E.compare(a, a + torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=torch.float64))
    assert "shape" in E.compare(a, a[:1])
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    assert E.compare(inf, inf.clone()) == "" and E.compare(inf, -inf) != ""


def test_torch_cpu_sdpa_with_a_float32_mask_on_float64_inputs_is_what_the_reference_avoids():
    """The torch behaviour behind the MHA refusal, kept as a test: if a torch release fixes it, this
    fails and says the workaround's reason is gone (the math reference stays right either way)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.triu(torch.full((16, 16), float("-inf")), 1)
    right = E.sdpa_reference(q, k, v, attn_mask=mask.double())
    assert (F.scaled_dot_product_attention(q, k, v, attn_mask=mask.double()) - right).abs().max() < 1e-12
    assert (F.scaled_dot_product_attention(q, k, v, attn_mask=mask) - right).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["none", "causal", "bool", "float", "bool-empty-rows", "float-ninf-rows",
                                  "scale", "gqa", "causal-tq-lt-tk", "causal-tq-gt-tk"])
def test_sdpa_reference_is_torch_sdpa_where_torch_is_right(kind):
    """`sdpa_reference` against torch's own SDPA where every input has one dtype (float64): the math
    definition the validator uses is torch's semantics, fully masked rows (0) included."""
    g = torch.Generator().manual_seed(0)
    tq, tk = {"causal-tq-lt-tk": (5, 9), "causal-tq-gt-tk": (9, 5)}.get(kind, (7, 7))
    hq, hkv = (4, 2) if kind == "gqa" else (4, 4)
    q = torch.randn(2, hq, tq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, hkv, tk, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kwargs = {}
    if kind.startswith("causal"):
        kwargs["is_causal"] = True
    elif kind.startswith("bool"):
        mask = torch.rand(2, 1, tq, tk, generator=g) > 0.4
        if kind == "bool-empty-rows":
            mask[:, :, 2] = False
        kwargs["attn_mask"] = mask
    elif kind.startswith("float"):
        mask = torch.randn(2, 1, tq, tk, generator=g, dtype=torch.float64)
        if kind == "float-ninf-rows":
            mask[:, :, 3] = float("-inf")
        kwargs["attn_mask"] = mask
    elif kind == "scale":
        kwargs["scale"] = 0.37
    elif kind == "gqa":
        kwargs["enable_gqa"] = True
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    got = E.sdpa_reference(q, k, v, **kwargs)
    assert E.compare(want, got) == "", E.compare(want, got)
