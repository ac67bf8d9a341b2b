"""A value head dim of its own (issue 21.1) beyond tests/lowering/test_features_issue21.py: the launchers called
directly (so the kernels run, not the reference), split-KV paged decode at MLA's absorbed sizes (q·k in 64-wide
chunks past 256 dims, v a prefix view of the k pool), half precision, the features combined (fill, sinks,
dropout), and the limits the kernels refuse with their name. Float64 oracle: attention_oracle.py; every output
buffer poisoned (NaN) before the launch.
"""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import attnlower.ops as public
from attnlower.lowering import plan as planning
from attnlower.lowering.launch import flash_backward, flash_forward
from attnlower.lowering.launch_paged import paged_forward
from attnlower.lowering.params import AttentionParams
from attnlower.lowering.target import Target

from attention_oracle import TOLERANCES, oracle  # sibling helper; pytest puts tests/lowering on sys.path

pytestmark = pytest.mark.usefixtures("poison_uninitialized")

CASES = [  # (Dqk, Dv, dtype, kwargs)
    (80, 48, torch.float32, dict(causal=True, bottom_right=True)),
    (24, 72, torch.float32, dict(causal=True, window=6)),
    (40, 16, torch.float16, dict(causal=True, softcap=2.0)),
    (16, 40, torch.bfloat16, dict()),
    (24, 20, torch.float32, dict(causal=True, fill=-1e9, sinks=True)),
]


@pytest.mark.parametrize("dqk,dv,dtype,kw", CASES, ids=[f"qk{a}-v{b}-{str(c)[6:]}" for a, b, c, _ in CASES])
def test_dense_kernels_value_head_dim(dqk, dv, dtype, kw):
    """The launchers: out [.., Dv], lse, dq / dk [.., Dqk], dv [.., Dv] (and dsinks), GQA 6 on 2, T = 37 / 29."""
    kw = dict(kw)
    with_sinks = kw.pop("sinks", False)
    fill = kw.pop("fill", None)
    tq, tk = (29, 37) if kw.get("bottom_right") else (37, 37)
    q = torch.randn(2, 6, tq, dqk, dtype=dtype)
    k, v = torch.randn(2, 2, tk, dqk, dtype=dtype), torch.randn(2, 2, tk, dv, dtype=dtype)
    sinks = torch.randn(6) if with_sinks else None
    scale = dqk ** -0.5
    params = AttentionParams(scale, kw.get("causal", False), kw.get("bottom_right", False), kw.get("window", 0),
                             kw.get("softcap", 0.0), mask_fill=float("-inf") if fill is None else fill)
    out, lse = flash_forward(q, k, v, params, sinks=sinks)
    assert out.shape == (2, 6, tq, dv) and out.dtype == dtype
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    sink_leaf = sinks.double().requires_grad_() if with_sinks else None
    want, want_lse = oracle(*leaves, scale=scale, sinks=sink_leaf, fill=fill, **kw)
    (fa, fr), (ba, br) = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), want.detach(), atol=fa, rtol=fr)
    torch.testing.assert_close(lse.double(), want_lse.detach(), atol=fa, rtol=fr)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, params, sinks=sinks, sinks_requires_grad=with_sinks)
    want.backward(grad_out.double())
    expected = leaves + ([sink_leaf] if with_sinks else [])
    for name, got, leaf in zip(("dq", "dk", "dv", "dsinks"), grads[:3] + grads[4:5], expected):
        assert got.shape == leaf.shape, name
        torch.testing.assert_close(got.double(), leaf.grad, atol=ba, rtol=br, msg=lambda m: f"{name}: {m}")


def _paged_dense(pool, table_row, length):
    block = pool.shape[2]
    t = torch.arange(length)
    return pool[table_row[t // block].long(), :, t % block].transpose(0, 1).unsqueeze(0)


PAGED = [  # (Dqk, Dv, heads, v is a view of the k pool, dtype)
    (576, 512, 16, True, torch.float32),       # DeepSeek-V3 absorbed: 512 latent + 64 rope, 16 local heads
    (300, 40, 4, False, torch.float32),        # chunked q·k (5 x 64, the last one partial), a separate v pool
    (576, 512, 8, True, torch.bfloat16),
    (26, 20, 8, True, torch.float16),
]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dqk,dv,heads,view,dtype", PAGED, ids=[f"qk{a}-v{b}-{str(e)[6:]}" for a, b, _, _, e in PAGED])
def test_paged_kernel_mla_sizes(dqk, dv, heads, view, dtype, splits):
    """One latent KV head shared by every query head; Tq = 2 (chunked prefill), lengths not multiples of the
    block, split-KV and not, sinks on half of the cases."""
    pool = torch.randn(12, 1, 8, dqk, dtype=dtype)
    v_pool = pool[..., :dv] if view else torch.randn(12, 1, 8, dv, dtype=dtype)
    table = torch.randperm(12)[:9].view(3, 3).to(torch.int32)
    lens = torch.tensor([19, 2, 24], dtype=torch.int32)
    q = torch.randn(3, heads, 2, dqk, dtype=dtype)
    sinks = torch.randn(heads) if splits == 3 else None
    scale = 192 ** -0.5
    out = paged_forward(q, pool, v_pool, table, lens, AttentionParams(scale, True), sinks=sinks, num_splits=splits)
    assert out.shape == (3, heads, 2, dv)
    fa, fr = TOLERANCES[dtype][0]
    for b in range(3):
        length = int(lens[b])
        want, _ = oracle(q[b:b + 1], _paged_dense(pool, table[b], length), _paged_dense(v_pool, table[b], length),
                         scale=scale, causal=True, bottom_right=True, sinks=sinks)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=fa, rtol=fr)


def test_head_dim_limits_are_named():
    """Dense kernels: q/k and v up to 256 each; paged: 576 / 512. Past them the kernels refuse, naming the limit
    and the fallback (the CPU reference takes any size)."""
    q, k = torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    with pytest.raises(NotImplementedError, match=r"expected v's head dim <= 256 for the dense kernels, got 272"):
        flash_forward(q, k, torch.randn(1, 2, 5, 272), AttentionParams(0.125))
    with pytest.raises(NotImplementedError, match=r"expected q/k's head dim <= 256 for the dense kernels, got 320"):
        flash_forward(torch.randn(1, 2, 5, 320), torch.randn(1, 2, 5, 320), k, AttentionParams(0.125))
    pool = torch.randn(4, 1, 4, 640)
    with pytest.raises(NotImplementedError, match=r"q/k's head dim <= 576 and v's <= 512, got 640 and 520"):
        paged_forward(torch.randn(1, 2, 1, 640), pool, pool[..., :520], torch.zeros(1, 2, dtype=torch.int32),
                      torch.tensor([3], dtype=torch.int32), AttentionParams(0.1, True))
    # CPU tensors through the op take the reference, which takes any size (on CUDA the kernels' refusal above)
    cpu = dict(device="cpu")
    out = public.flash_attention(torch.randn(1, 2, 5, 64, **cpu), torch.randn(1, 2, 5, 64, **cpu),
                                 torch.randn(1, 2, 5, 272, **cpu))
    assert out.shape == (1, 2, 5, 272)


def test_head_dim_limit_through_the_op_on_the_kernel_path(monkeypatch):
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    q, k = torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    with pytest.raises(NotImplementedError, match="v's head dim <= 256"):
        public.flash_attention(q, k, torch.randn(1, 2, 5, 264))


def test_plan_reads_the_value_head_dim():
    """Separate pads for q/k and v; the tiles follow the wider; the paged plan chunks q·k past 256 dims."""
    h200 = Target("cuda", 90, 132, False, 232448, "NVIDIA H200")
    params = AttentionParams(0.1, True)
    dense = planning.kernel_plan("flash_attention", params, batch=1, q_heads=16, kv_heads=16, tq=1024, tk=1024,
                                 head_dim=192, v_head_dim=128, dtype=torch.bfloat16, target=h200)
    c = dense["launches"][0]["constexprs"]
    assert (c["HEAD_DIM"], c["HEAD_DIM_PAD"], c["HEAD_DIM_V"], c["HEAD_DIM_V_PAD"]) == (192, 256, 128, 128)
    paged = planning.kernel_plan("paged_attention", params, batch=4, q_heads=16, kv_heads=1, tq=1, tk=4096,
                                 head_dim=576, v_head_dim=512, dtype=torch.bfloat16, target=h200, block_size=64)
    c = paged["launches"][0]["constexprs"]
    assert (c["QK_CHUNK"], c["NUM_QK_CHUNKS"], c["HEAD_DIM_V_PAD"]) == (64, 9, 512)
    assert paged["launches"][-1]["constexprs"]["HEAD_DIM_V"] == 512


def test_opcheck_paged_value_head_dim():
    """The paged op's fake and real implementations agree on out [.., Dv] with v a prefix view of the k pool."""
    pool = torch.randn(6, 1, 4, 26)
    table = torch.tensor([[2, 0, 5], [1, 3, 4]], dtype=torch.int32)
    q = torch.randn(2, 4, 2, 26)
    opcheck(torch.ops.attnlower.paged_attention, (q, pool, pool[..., :20], table, torch.tensor([9, 5], dtype=torch.int32)),
            dict(scale=0.2, sinks=torch.randn(4)))
