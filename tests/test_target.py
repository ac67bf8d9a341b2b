"""The seam to the lowering (attnlower/target.py): the Target of a device and the launch plan the dump shows."""
from __future__ import annotations

import pytest
import torch

from attnlower.lowering import configs
from attnlower.passes.site import AttentionSpec
from attnlower.target import Target, kernel_plan, kernels_of, target_for


def spec(op="flash_attention", head_dim=80, causal=True, window=0, bias_kind="none", block=None):
    return AttentionSpec(op=op, q_heads=6, kv_heads=2, head_dim=head_dim, dtype="float16", causal=causal,
                         window=window, bias_kind=bias_kind, scale=head_dim ** -0.5, paged_block_size=block)


def test_targets_of_devices(monkeypatch):
    monkeypatch.delenv("ATTNLOWER_CPU_KERNELS", raising=False)
    assert target_for(torch.device("cpu")) == Target("cpu")
    monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
    assert target_for(torch.device("cpu")).kind == "interpret"
    assert Target("cuda", arch=90, sm_count=132, name="NVIDIA H100").describe() == "NVIDIA H100 (sm_90, 132 SMs)"


def test_flash_plan_has_the_tiles_the_configs_choose_for_an_odd_head_dim():
    h100 = Target("cuda", arch=90, sm_count=132, name="NVIDIA H100")
    plan = kernel_plan(spec(head_dim=80), h100, q_len=37)
    want = configs.flash_config(90, 80, torch.float16, True, 0, "fwd", seq_len=37)
    assert (plan["block_m"], plan["block_n"], plan["num_warps"]) == (want.block_m, want.block_n, want.num_warps)
    assert plan["kernels"] == [k for _, names, _ in kernels_of("flash_attention") for k in names]
    assert plan["constexprs"]["HEAD_DIM"] == 80 and plan["constexprs"]["IS_CAUSAL"] is True
    assert plan["runs"] == "triton"


def test_sliding_and_paged_plans_say_what_they_fix_and_what_is_chosen_at_launch():
    band = kernel_plan(spec(op="sliding_window_attention", window=16), Target("interpret"), q_len=64)
    assert band["constexprs"]["HAS_WINDOW"] is True and band["runs"].startswith("triton (interpreter")
    paged = kernel_plan(spec(op="paged_attention", causal=False, block=16), Target("cpu"))
    assert paged["kernels"] == ["_paged_attn_kernel", "_paged_reduce_kernel"]
    assert "chosen at launch" in paged["constexprs"]["SPLIT"] and "Tq unknown" in paged["note"]
    assert paged["runs"].startswith("reference")


def test_beyond_the_kernels_there_is_no_plan_but_a_reason():
    plan = kernel_plan(spec(head_dim=512), Target("cuda", arch=90, sm_count=132, name="NVIDIA H100"), q_len=8)
    assert plan["constexprs"] == {} and plan["note"].startswith("no launch plan:")


@pytest.mark.parametrize("when, names", [("forward", ["_flash_fwd_kernel"]),
                                         ("backward", ["_flash_bwd_preprocess_kernel", "_flash_bwd_dkdv_kernel",
                                                       "_flash_bwd_dq_kernel"])])
def test_kernels_of_each_direction(when, names):
    assert [k for _, ks, _ in kernels_of("sliding_window_attention", when) for k in ks] == names
    assert kernels_of("no_such_op") == []


def test_the_dump_plans_the_tiles_that_run_for_a_decode_over_a_long_cache():
    """Issue 23: the dump once planned Tk := Tq, printing a decode's (Tq=1, Tk=4096) tiles for Tk=1. It now
    asks the launchers' planner with the site's real lengths: the tiles are the ones the forward launches."""
    from attnlower.lowering import plan as planning
    from attnlower.lowering.params import AttentionParams

    h200 = Target("cuda", arch=90, sm_count=132, name="NVIDIA H200")
    s = spec(head_dim=128, causal=False)
    shown = kernel_plan(s, h200, q_len=1, k_len=4096)
    params = AttentionParams(s.scale)
    q = planning.Meta((1, 6, 1, 128), torch.float16)
    kv = planning.Meta((1, 2, 4096, 128), torch.float16)
    (launch,) = planning.dense_plan(params, "fwd", q, kv, kv, None, False, h200).launches
    assert (shown["block_m"], shown["block_n"], shown["num_warps"], shown["num_stages"]) == \
        (launch.config.block_m, launch.config.block_n, launch.config.num_warps, launch.config.num_stages)
    assert "note" not in shown
