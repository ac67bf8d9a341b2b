"""lowering/configs.py: the dense tiles fit the target's shared memory whatever bias rides along.

The forward pipelines the bias tile with K and V: a 16-bit dense bias at T = 8192 took the measured 128x128 tiles
with 3 stages and failed to launch on the H200 (262144 bytes with a bool mask, a block gets 232448; bench/modern.py,
2026-12-04). tests/lowering/sm90_compile.py --fits checks every planned launch against the compiler; these check the
plan's own rule without a compiler."""
import itertools

import pytest
import torch

from attnlower.lowering import configs, plan
from attnlower.lowering.params import AttentionParams

SM90 = plan.Target("cuda", 90, 132, False, 232448)
BIAS_BYTES = (0, 1, 2, 4)   # none, a bool mask, a 16-bit bias, an fp32 bias


def _forward(tq, tk, d, dtype, bias_dtype, causal=False):
    q = plan.Meta((1, 16, tq, d), dtype)
    kv = plan.Meta((1, 16, tk, d), dtype)
    bias = None if bias_dtype is None else plan.Meta((1, 1, tq, tk), bias_dtype)
    (launch,) = plan.dense_plan(AttentionParams(d ** -0.5, causal), "fwd", q, kv, kv, bias, False, SM90).launches
    return launch.config


def test_a_dense_bias_at_long_lengths_drops_a_stage_instead_of_overflowing_shared_memory():
    plain = _forward(8192, 8192, 128, torch.bfloat16, None)
    masked = _forward(8192, 8192, 128, torch.bfloat16, torch.bool)
    assert (plain.block_m, plain.block_n, plain.num_stages) == (128, 128, 3)   # the measured tile, unchanged
    assert (masked.block_m, masked.block_n, masked.num_stages) == (128, 128, 2)
    assert configs.forward_shared_bytes(128, 128, 3, 128, 2, 1) == 262144     # what the H200 refused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_planned_forward_fits_by_the_shared_memory_model(dtype):
    seen = 0
    for d, tk, causal, bias_bytes in itertools.product((16, 64, 80, 128, 192, 256), (1, 197, 1024, 4096, 16384),
                                                       (False, True), BIAS_BYTES):
        bias_dtype = {0: None, 1: torch.bool, 2: torch.bfloat16, 4: torch.float32}[bias_bytes]
        c = _forward(tk, tk, d, dtype, bias_dtype, causal)
        need = configs.forward_shared_bytes(c.block_m, c.block_n, c.num_stages, plan.head_dim_pad(d), dtype.itemsize,
                                            bias_bytes)
        assert c.num_stages >= 1
        assert need <= SM90.shared_memory_per_block or c.num_stages == 1, (d, tk, causal, bias_bytes, c, need)
        seen += 1
    assert seen == 6 * 5 * 2 * 4


def test_no_limit_known_keeps_the_measured_stages():
    unlimited = plan.Target("cuda", 90, 132, False, 0)
    q = kv = plan.Meta((1, 16, 8192, 128), torch.bfloat16)
    bias = plan.Meta((1, 1, 8192, 8192), torch.bool)
    (launch,) = plan.dense_plan(AttentionParams(0.1, False), "fwd", q, kv, kv, bias, False, unlimited).launches
    assert launch.config.num_stages == 3


@pytest.mark.gpu
@pytest.mark.parametrize("bias_dtype", [torch.bool, torch.bfloat16, torch.float32])
def test_a_dense_bias_on_the_measured_long_tiles_launches_and_matches_sdpa(bias_dtype):
    import torch.nn.functional as F

    import attnlower.ops as ops

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    t = 2048   # Tk > 1024: the 128x128 tiles of configs._FLASH_FWD_BY_LEN
    q, k, v = (torch.randn(1, 4, t, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = torch.rand(t, t, device="cuda") > 0.3
    bias = keep if bias_dtype == torch.bool else torch.where(keep, 0.0, -1e4).to(bias_dtype)
    out = ops.flash_attention(q, k, v, bias=bias)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias if bias_dtype == torch.bool
                                         else bias.float())
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 2e-2
