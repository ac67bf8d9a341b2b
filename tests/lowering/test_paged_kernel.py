"""The paged-attention Triton kernel (`launch_paged.paged_forward`) against a float64 oracle.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small and
odd: lengths 1/17/37 that are not multiples of the block size, shuffled block tables whose
unused entries are -1 (a kernel that reads past a sequence's blocks fails), outputs and
split-KV workspaces allocated NaN-filled (a row or split the kernel forgets to write fails).
"""
from __future__ import annotations

import math

import pytest
import torch

from attnlower.lowering import configs, launch_paged, plan
from attnlower.lowering.configs import KernelConfig, paged_config, paged_num_splits
from attnlower.lowering.launch_paged import paged_forward
from attnlower.lowering.params import AttentionParams

TOLERANCE = {  # (atol, rtol) against the float64 oracle fed the same (rounded) inputs
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def oracle_paged(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, scale, causal, window, softcap):
    """Float64 paged attention: gather each sequence's keys, dense masked attention, empty rows 0."""
    batch, q_heads, tq, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(batch, q_heads, tq, head_dim, dtype=torch.float64, device=q.device)
    for b in range(batch):
        length = int(seq_lens[b])
        t = torch.arange(length, device=q.device)
        blocks = block_table[b, t // block_size].long()
        k = k_cache[blocks, :, t % block_size].double().transpose(0, 1).repeat_interleave(group, 0)
        v = v_cache[blocks, :, t % block_size].double().transpose(0, 1).repeat_interleave(group, 0)
        s = scale * (q[b].double() @ k.transpose(-1, -2))                  # [Hq, Tq, L]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        pos = (length - tq + torch.arange(tq, device=q.device))[:, None]   # [Tq, 1]
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
            s = s + slopes.double()[:, None, None] * (t[None, :] - pos)
        visible = torch.ones(tq, length, dtype=torch.bool, device=q.device)
        if causal:
            visible &= t[None, :] <= pos
        if window > 0:
            visible &= t[None, :] > pos - window
        s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)                        # empty rows -> 0
        out[b] = p @ v
    return out


def make_paged_inputs(batch_lens, q_heads, kv_heads, head_dim, tq, block_size, dtype, device=None,
                      spare_columns=2, alibi=None):
    """Random paged inputs with a shuffled block table; unused table entries are -1.

    q is a transposed BSHD view and the caches are slices of one [num_blocks, 2, ...] KV
    buffer, so the launcher sees non-contiguous tensors as it does in real models.
    """
    batch = len(batch_lens)
    max_blocks = max(math.ceil(n / block_size) for n in batch_lens) + spare_columns
    num_blocks = batch * max_blocks + 3
    kv = torch.randn(num_blocks, 2, kv_heads, block_size, head_dim, device=device).to(dtype)
    k_cache, v_cache = kv[:, 0], kv[:, 1]
    perm = torch.randperm(num_blocks, device=device)
    block_table = torch.full((batch, max_blocks), -1, dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(batch_lens):
        need = math.ceil(n / block_size)
        block_table[b, :need] = perm[used:used + need].int()
        used += need
    seq_lens = torch.tensor(batch_lens, dtype=torch.int32, device=device)
    q = torch.randn(batch, tq, q_heads, head_dim, device=device).to(dtype).transpose(1, 2)
    slopes = None
    if alibi == "heads":
        slopes = torch.rand(q_heads, device=device)
    elif alibi == "batch_heads":
        slopes = torch.rand(batch, q_heads, device=device)
    return q, k_cache, v_cache, block_table, seq_lens, slopes


@pytest.fixture(autouse=True)
def _poison_allocations(monkeypatch):
    """Make torch.empty / empty_like inside the launcher return NaN-filled float tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    class _PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            return poison(real_empty(*args, **kwargs))

        @staticmethod
        def empty_like(*args, **kwargs):
            return poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(launch_paged, "torch", _PoisonedTorch())


def run_and_check(inputs, scale, causal, window, softcap, dtype, **overrides):
    q, k_cache, v_cache, block_table, seq_lens, slopes = inputs
    out = paged_forward(q, k_cache, v_cache, block_table, seq_lens,
                        AttentionParams(scale, causal, window=window, softcap=softcap), alibi_slopes=slopes,
                        **overrides)
    assert out.shape == q.shape and out.dtype == dtype and out.stride() == torch.empty_like(q).stride()  # q's layout
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite output"
    expected = oracle_paged(q, k_cache, v_cache, block_table, seq_lens, slopes, scale, causal, window, softcap)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    return out


# (block_size, Hq, Hkv, D, Tq, causal, window, softcap, alibi, block_n override)
CASES = [
    pytest.param(16, 4, 4, 64, 1, True, 0, 0.0, None, None, id="decode-mha"),
    pytest.param(8, 8, 2, 80, 1, True, 0, 0.0, None, None, id="decode-gqa4-d80"),
    pytest.param(32, 8, 1, 128, 1, True, 0, 0.0, None, None, id="decode-mqa8-d128"),
    pytest.param(16, 8, 2, 64, 5, True, 0, 0.0, None, None, id="prefill-causal"),
    pytest.param(16, 8, 2, 64, 5, False, 0, 0.0, None, None, id="prefill-noncausal"),
    pytest.param(8, 4, 1, 80, 5, True, 0, 0.0, None, None, id="prefill-mqa-d80"),
    pytest.param(16, 4, 2, 64, 1, True, 13, 0.0, None, None, id="decode-window"),
    pytest.param(8, 8, 2, 64, 5, True, 10, 0.0, None, 16, id="prefill-window"),
    pytest.param(8, 4, 2, 64, 5, False, 6, 0.0, None, None, id="noncausal-window"),
    pytest.param(16, 4, 2, 64, 1, True, 0, 5.0, None, None, id="decode-softcap"),
    pytest.param(16, 8, 2, 80, 5, True, 0, 0.0, "heads", None, id="prefill-alibi"),
    pytest.param(32, 8, 8, 64, 5, False, 0, 0.0, "batch_heads", None, id="alibi-per-batch"),
    pytest.param(8, 16, 2, 64, 5, True, 9, 30.0, "heads", None, id="gqa8-window-softcap-alibi"),
    pytest.param(32, 4, 2, 64, 5, True, 0, 0.0, None, 16, id="tile-inside-block"),
    pytest.param(8, 4, 2, 64, 1, True, 0, 0.0, None, 32, id="tile-spans-blocks"),
    pytest.param(16, 2, 1, 16, 5, True, 0, 0.0, None, None, id="d16"),
    pytest.param(16, 2, 1, 256, 1, True, 0, 0.0, None, None, id="d256"),
]


@pytest.mark.parametrize("block_size, q_heads, kv_heads, head_dim, tq, causal, window, softcap, alibi, block_n",
                         CASES)
def test_paged_fp32_matches_oracle_split_and_not(block_size, q_heads, kv_heads, head_dim, tq, causal, window,
                                                 softcap, alibi, block_n):
    inputs = make_paged_inputs([max(1, tq), 17, 37], q_heads, kv_heads, head_dim, tq, block_size, torch.float32,
                               alibi=alibi)
    config = None
    if block_n is not None:
        base = paged_config(0, head_dim, torch.float32, block_size, q_heads // kv_heads, tq)
        config = KernelConfig(base.block_m, block_n, base.num_warps, base.num_stages)
    scale = 1.0 / math.sqrt(head_dim)
    whole = run_and_check(inputs, scale, causal, window, softcap, torch.float32, num_splits=1, config=config)
    split = run_and_check(inputs, scale, causal, window, softcap, torch.float32, num_splits=3, config=config)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    # from 3 stages the kernel reads each tile's physical blocks one iteration ahead (TABLE_AHEAD), here over tiles of
    # 16 keys (3 per sequence of 37: unsplit, in two splits carrying the table into a second tile, in three): the same
    base = config or paged_config(0, head_dim, torch.float32, block_size, q_heads // kv_heads, tq)
    deep = KernelConfig(base.block_m, 16, base.num_warps, 3)
    for splits in (1, 2, 3):
        ahead = run_and_check(inputs, scale, causal, window, softcap, torch.float32, num_splits=splits, config=deep)
        torch.testing.assert_close(ahead, whole, atol=1e-5, rtol=1e-5)
    # and with 2 stages, the block ids read in each tile's own iteration (the plan's decode tiles take 3)
    if base.num_stages != 2:
        same = KernelConfig(base.block_m, base.block_n, base.num_warps, 2)
        for splits in (1, 3):
            out = run_and_check(inputs, scale, causal, window, softcap, torch.float32, num_splits=splits, config=same)
            torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("block_size, q_heads, kv_heads, head_dim, tq, causal, window, softcap, alibi", [
    pytest.param(8, 8, 2, 80, 1, True, 0, 0.0, None, id="decode-gqa4-d80"),
    pytest.param(16, 8, 2, 128, 5, True, 11, 20.0, "heads", id="prefill-window-softcap-alibi"),
])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_paged_half_precision(dtype, block_size, q_heads, kv_heads, head_dim, tq, causal, window, softcap,
                              alibi, num_splits):
    inputs = make_paged_inputs([5, 37], q_heads, kv_heads, head_dim, tq, block_size, dtype, alibi=alibi)
    run_and_check(inputs, head_dim ** -0.5, causal, window, softcap, dtype, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_empty_rows_are_zero(num_splits):
    # seq 0 holds no token at all (a padding slot of a fixed-size batch): its rows are 0; seq 1 holds exactly
    # its 5 queries; with a window of 1, each query sees only itself. (0 < seq_len < Tq is an error: BAD_CASES.)
    inputs = make_paged_inputs([0, 5, 19], 4, 2, 64, 5, 8, torch.float32)
    out = run_and_check(inputs, 0.125, True, 0, 0.0, torch.float32, num_splits=num_splits)
    assert (out[0] == 0).all() and (out[1] != 0).any()
    run_and_check(inputs, 0.125, True, 1, 0.0, torch.float32, num_splits=num_splits)


def test_paged_more_splits_than_tiles():
    # 9 splits over sequences of at most 2 key tiles: most splits are empty and must not
    # disturb the reduction (their m = -inf, l = 0)
    inputs = make_paged_inputs([3, 70], 4, 1, 64, 1, 16, torch.float32)
    run_and_check(inputs, 0.125, True, 0, 0.0, torch.float32, num_splits=9)


def test_paged_heuristic_splits_long_decode(monkeypatch):
    """With one program and a long table, the launcher splits on its own (and stays correct): by default the
    separate reduce combines (configs.PAGED_REDUCE, timed faster on the H200); asked, in one launch whose last split
    combines (FUSED_REDUCE)."""
    seen = []

    class _RecordingKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.kernel.fn.__name__, grid, kwargs.get("FUSED_REDUCE")))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_paged_attn_kernel", "_paged_reduce_kernel"):
        monkeypatch.setattr(launch_paged, name, _RecordingKernel(getattr(launch_paged, name)))
    inputs = make_paged_inputs([600], 4, 1, 64, 1, 16, torch.float32)
    expected_splits = paged_num_splits(plan.target_of(torch.device("cpu")).sm_count, 1, inputs[3].shape[1] * 16)
    assert expected_splits > 1
    run_and_check(inputs, 0.125, True, 0, 0.0, torch.float32, reduce="fused")
    assert seen == [("_paged_attn_kernel", (1, 1, expected_splits), True)], "expected one fused split launch"
    seen.clear()
    run_and_check(inputs, 0.125, True, 0, 0.0, torch.float32)
    assert seen == [("_paged_attn_kernel", (1, 1, expected_splits), False), ("_paged_reduce_kernel", (4, 1, 1), None)]


# ---------------------------------------------------------------------------------------------
# The split-KV combine: fused into the attention kernel (its last split program per tile) or separate
# ---------------------------------------------------------------------------------------------
# Triton's interpreter runs a launch's programs one after another, so these tests cannot show a race between the
# split programs of a tile (the ordering argument: kernels/paged_decode.py, `_last_split_combines`); they check the
# combine's math, which split is last, the counters' reset and what is written. test_paged_gpu_fused_reduce runs
# the programs concurrently on a GPU.

def reference(inputs, params, sinks=None):
    """lowering/reference.py's paged attention in float64 (sinks, empty_rows_nan, short sequences)."""
    from attnlower.lowering.reference import reference_paged_forward

    q, k_cache, v_cache, block_table, seq_lens, slopes = inputs
    return reference_paged_forward(q.double(), k_cache.double(), v_cache.double(), block_table, seq_lens, params,
                                   alibi_slopes=slopes, sinks=None if sinks is None else sinks.double())


def assert_same_combine(fused, separate):
    """The fused and separate combines run one `_combine_partials` on the same partials: bit for bit in the interpreter
    (the same numpy sums); compiled, the two kernels (other warps, other layouts) may sum the splits in another
    order, so within fp32 rounding there."""
    exact = fused.device.type == "cpu"
    torch.testing.assert_close(fused, separate, atol=0 if exact else 1e-6, rtol=0 if exact else 1e-5, equal_nan=True)


def fused_and_separate(inputs, params, splits, sinks=None, config=None):
    """Both combines of one split call, their counters checked back at zero; returns (fused, separate)."""
    q, k_cache, v_cache, block_table, seq_lens, slopes = inputs
    outs = {}
    for reduce in ("fused", "separate"):
        outs[reduce] = paged_forward(q, k_cache, v_cache, block_table, seq_lens, params, alibi_slopes=slopes,
                                     sinks=sinks, num_splits=splits, config=config, reduce=reduce)
        assert not launch_paged.split_counters(q.device).any(), f"{reduce}: a tile counter was left set"
    return outs["fused"], outs["separate"]


# (lens, Hq, Hkv, D, Tq, block_size, window): GQA groups 1 / 3 / 4, decode and chunks, sequences empty (0), inside
# one key tile (3), shorter than the chunk (2 < Tq: short sequences), and long enough for every split to hold keys
DECODE = ([0, 3, 37, 70], 6, 2, 40, 1, 8, 0)
CHUNK3 = ([2, 19, 70], 8, 2, 24, 3, 16, 0)
CHUNK2_WINDOW = ([0, 70, 5], 3, 3, 16, 2, 4, 9)
FUSED_CASES = [pytest.param(*DECODE, splits, True, id=f"decode-gqa3-d40-s{splits}-nan") for splits in range(2, 8)] + [
    pytest.param(*DECODE, 3, None, id="decode-gqa3-d40-s3-zero"),
    pytest.param(*CHUNK3, 2, False, id="chunk3-gqa4-d24-s2-zero"),
    pytest.param(*CHUNK3, 5, True, id="chunk3-gqa4-d24-s5-nan"),
    pytest.param(*CHUNK2_WINDOW, 4, False, id="chunk2-mha-window-s4-zero"),
    pytest.param(*CHUNK2_WINDOW, 7, True, id="chunk2-mha-window-s7-nan"),
]


@pytest.mark.usefixtures("poison_uninitialized")   # out starts NaN: every element must be written
@pytest.mark.parametrize("lens, q_heads, kv_heads, head_dim, tq, block_size, window, splits, empty_rows_nan",
                         FUSED_CASES)
def test_fused_reduce_matches_separate_and_reference(lens, q_heads, kv_heads, head_dim, tq, block_size, window,
                                                     splits, empty_rows_nan):
    """16-key tiles: 70 keys are 5 tiles, so 6 and 7 splits leave empty splits everywhere, and a sequence of 3 or
    5 keys leaves all but one split empty; a sequence of 0 keys (or a query before its sequence's first token) is
    an empty row: 0, or NaN with empty_rows_nan=True. The fused combine runs the separate one's math (one
    `_combine_partials`) on the same partials (assert_same_combine)."""
    inputs = make_paged_inputs(lens, q_heads, kv_heads, head_dim, tq, block_size, torch.float32)
    base = paged_config(0, head_dim, torch.float32, block_size, q_heads // kv_heads, tq)
    config = KernelConfig(base.block_m, 16, base.num_warps, base.num_stages)
    params = AttentionParams(head_dim ** -0.5, True, window=window, empty_rows_nan=bool(empty_rows_nan),
                             short_sequences=empty_rows_nan is not None)
    fused, separate = fused_and_separate(inputs, params, splits, config=config)
    assert_same_combine(fused, separate)
    want = reference(inputs, params)
    assert torch.isnan(want).any() == bool(empty_rows_nan and (0 in lens or min(lens) < tq))
    torch.testing.assert_close(fused.double(), want, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.usefixtures("poison_uninitialized")
@pytest.mark.parametrize("rows_at_once", [1, 2, 4])
@pytest.mark.parametrize("case", [CHUNK3, DECODE], ids=["chunk3-gqa4-12rows", "decode-gqa3-3rows"])
def test_fused_combine_in_batches_of_rows(monkeypatch, case, rows_at_once):
    """The fused combine loads COMBINE_ROWS of a tile's rows at once and loops over the tile's rows in such batches:
    with the budget cut down to 1, 2 and 4 rows, 12 rows are 12, 6 and 3 batches and 3 rows 3, 2 (the last one
    half masked) and 1; each gives the separate reduce's output bit for bit in the interpreter, with sinks."""
    from attnlower.lowering import configs

    lens, q_heads, kv_heads, head_dim, tq, block_size, window = case
    splits = 3
    v_pad = max(16, 1 << (head_dim - 1).bit_length())
    monkeypatch.setattr(configs, "_PAGED_COMBINE_ELEMENTS", rows_at_once * 4 * v_pad)   # SPLITS_PAD of 3 splits: 4
    plan.paged_plan.cache_clear()      # plans are cached: none made with another budget, none left with this one
    try:
        _check_combine_batches(lens, q_heads, kv_heads, head_dim, tq, block_size, window, splits, rows_at_once)
    finally:
        plan.paged_plan.cache_clear()


def _check_combine_batches(lens, q_heads, kv_heads, head_dim, tq, block_size, window, splits, rows_at_once):
    planned = plan.paged_plan(AttentionParams(0.3, True), plan.Meta((len(lens), q_heads, tq, head_dim), torch.float32),
                              plan.Meta((64, kv_heads, block_size, head_dim), torch.float32),
                              plan.Meta((len(lens), 16), torch.int32), False, plan.target_of(torch.device("cpu")),
                              True, num_splits=splits, reduce="fused")
    rows = q_heads // kv_heads * tq
    assert dict(planned.launches[0].constexprs)["COMBINE_ROWS"] == min(rows_at_once, 1 << (rows - 1).bit_length())
    inputs = make_paged_inputs(lens, q_heads, kv_heads, head_dim, tq, block_size, torch.float32)
    sinks = torch.randn(q_heads)
    params = AttentionParams(head_dim ** -0.5, True, window=window, short_sequences=True)
    fused, separate = fused_and_separate(inputs, params, splits, sinks=sinks)
    assert_same_combine(fused, separate)
    torch.testing.assert_close(fused.double(), reference(inputs, params, sinks), atol=1e-5, rtol=1e-5)


def test_paged_combine_rows_covers_the_tile_within_the_budget():
    from attnlower.lowering.configs import _PAGED_COMBINE_ELEMENTS, paged_combine_rows

    assert paged_combine_rows(4, 16, 16, 128) == 4          # decode, GQA 4, 16 splits: the tile's rows at once
    assert paged_combine_rows(3, 16, 8, 64) == 4            # a power of two covering 3 rows (one masked)
    assert paged_combine_rows(48, 16, 2, 128) == 16         # never more than the tile's BLOCK_M rows
    assert paged_combine_rows(4, 16, 16, 512) == 1          # MLA's 512-wide V at 16 splits: the budget's one row
    assert paged_combine_rows(8, 16, 64, 512) == 1          # past the budget: still one row (as the per-row combine)
    for rows, splits_pad, v_pad in ((8, 4, 128), (16, 2, 256), (5, 32, 64)):
        r = paged_combine_rows(rows, 16, splits_pad, v_pad)
        assert r & (r - 1) == 0 and (r == 1 or r * splits_pad * v_pad <= _PAGED_COMBINE_ELEMENTS)


@pytest.mark.usefixtures("poison_uninitialized")
@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("empty_rows_nan", [False, True])
def test_fused_reduce_adds_the_sink_once(splits, empty_rows_nan):
    """Sinks: the combine adds each head's sink once, after the splits (a -inf sink adds nothing: an empty row of
    that head stays empty, NaN with empty_rows_nan); GQA group 3, a chunk of 2 queries, an empty sequence."""
    inputs = make_paged_inputs([0, 3, 45], 6, 2, 32, 2, 8, torch.float32)
    sinks = torch.randn(6) * 2
    sinks[4] = float("-inf")
    params = AttentionParams(0.2, True, empty_rows_nan=empty_rows_nan, short_sequences=True)
    fused, separate = fused_and_separate(inputs, params, splits, sinks=sinks)
    assert_same_combine(fused, separate)
    want = reference(inputs, params, sinks)
    torch.testing.assert_close(fused.double(), want, atol=1e-5, rtol=1e-5, equal_nan=True)
    empty = fused[0]                                   # sequence 0 holds no key: only the sinks
    assert (empty[[0, 1, 2, 3, 5]] == 0).all()
    assert empty[4].isnan().all() if empty_rows_nan else (empty[4] == 0).all()


def test_fused_reduce_consecutive_calls_reset_their_counters():
    """Each call leaves its tiles' counters at 0, so the next call (other lengths, other splits, more tiles) finds
    its last split right; the counters are the device's one buffer, kept across calls."""
    counters = launch_paged.split_counters(torch.empty(0).device)
    for lens, splits in (([37, 70, 9], 3), ([70, 1, 64, 20], 7), ([37, 70, 9], 3)):
        inputs = make_paged_inputs(lens, 8, 2, 16, 1, 4, torch.float32)
        out = run_and_check(inputs, 0.25, True, 0, 0.0, torch.float32, num_splits=splits, reduce="fused")
        assert launch_paged.split_counters(out.device) is counters and not counters.any()


def test_fused_reduce_without_counters_takes_the_separate_reduce(monkeypatch, caplog):
    """The first split call on a device inside a CUDA graph capture cannot allocate the counters (split_counters
    gives None): that call takes the separate reduce, said in a warning, and stays right."""
    seen = []
    real_reduce = launch_paged._paged_reduce_kernel

    class _RecordingReduce:
        def __getitem__(self, grid):
            seen.append(grid)
            return real_reduce[grid]

    monkeypatch.setattr(launch_paged, "split_counters", lambda device: None)
    monkeypatch.setattr(launch_paged, "_paged_reduce_kernel", _RecordingReduce())
    inputs = make_paged_inputs([37, 70], 4, 2, 16, 1, 8, torch.float32)
    with caplog.at_level("WARNING", logger=launch_paged.__name__):
        run_and_check(inputs, 0.25, True, 0, 0.0, torch.float32, num_splits=3, reduce="fused")
    assert seen == [(8, 1, 1)] and "takes the separate reduce" in caplog.text


def test_pdl_launches_the_separate_reduce_on_sm90_only_and_is_off_by_default():
    """Programmatic dependent launch: asked (or configs.PAGED_PDL), a split call on an sm_90 CUDA target launches the
    reduce with `launch_pdl`, the attention kernel letting it start (LAUNCH_DEPENDENTS) and the reduce waiting for it
    (WAIT_PRIOR); not on the interpreter or an older GPU, not for a fused or an unsplit call."""
    params = AttentionParams(0.1, True)
    pool = plan.Meta((64, 8, 16, 128), torch.bfloat16)

    def paged(target, splits=None, reduce=None, pdl=None):
        return plan.paged_plan(params, plan.Meta((1, 32, 1, 128), torch.bfloat16), pool,
                               plan.Meta((1, 256), torch.int32), False, target, True, splits, None, False, 128,
                               reduce, pdl)

    def pdl_of(planned):
        attn = dict(planned.launches[0].constexprs)["LAUNCH_DEPENDENTS"]
        if len(planned.launches) == 1:
            return attn, None, None
        reduce = planned.launches[1]
        return attn, dict(reduce.constexprs)["WAIT_PRIOR"], reduce.launch_kwargs.get("launch_pdl", False)

    hopper, ampere = plan.Target("cuda", 90, 132, False), plan.Target("cuda", 80, 108, False)
    assert configs.PAGED_PDL is False and pdl_of(paged(hopper)) == (False, False, False)
    assert pdl_of(paged(hopper, pdl=True)) == (True, True, True)
    assert "launch_pdl" not in paged(hopper, pdl=True).launches[0].launch_kwargs
    assert pdl_of(paged(ampere, pdl=True)) == (False, False, False)
    assert pdl_of(paged(plan.Target("cuda", 94, 304, False, rocm=True), pdl=True)) == (False, False, False)  # AMD
    assert pdl_of(paged(plan.Target("interpret", 0, 4, False), splits=4, pdl=True)) == (False, False, False)
    assert pdl_of(paged(hopper, reduce="fused", pdl=True)) == (False, None, None)
    assert pdl_of(paged(hopper, splits=1, pdl=True)) == (False, None, None)


def test_reduce_is_the_measured_default_and_fused_on_request_within_the_counters():
    target = plan.Target("cuda", 90, 132, False)
    params = AttentionParams(0.1, True)
    pool = plan.Meta((64, 8, 16, 128), torch.bfloat16)

    def paged(batch, splits=None, reduce=None):
        return plan.paged_plan(params, plan.Meta((batch, 32, 1, 128), torch.bfloat16), pool,
                               plan.Meta((batch, 256), torch.int32), False, target, True, splits, None, False, 128,
                               reduce)

    decode = paged(1, reduce="fused")
    splits = 256 * 16 // configs._PAGED_MIN_TOKENS_PER_SPLIT    # 8 programs: the length bounds the split count
    assert decode.num_splits == splits and decode.fused and [k.kernel for k in decode.launches] == ["_paged_attn_kernel"]
    assert dict(decode.launches[0].constexprs)["SPLITS_PAD"] == splits
    # the default: the H200 timed the separate reduce faster (configs.PAGED_REDUCE)
    assert paged(1).reduce == configs.PAGED_REDUCE == "separate"
    separate = paged(1, reduce="separate")
    assert [k.kernel for k in separate.launches] == ["_paged_attn_kernel", "_paged_reduce_kernel"]
    assert dict(separate.launches[0].constexprs)["FUSED_REDUCE"] is False
    assert paged(1, splits=1).reduce == "" and not dict(paged(1, splits=1).launches[0].constexprs)["FUSED_REDUCE"]
    many = configs.PAGED_FUSED_MAX_TILES // 8 + 1          # more tiles (B * Hkv) than the device's counters
    assert paged(many, splits=2).reduce == "separate"
    with pytest.raises(ValueError, match="PAGED_FUSED_MAX_TILES"):
        paged(many, splits=2, reduce="fused")
    with pytest.raises(ValueError, match="reduce: expected one of"):
        paged(1, reduce="both")


def test_paged_num_splits_heuristic():
    assert paged_num_splits(132, 132, 1 << 16) == 1                  # grid already fills the GPU
    assert paged_num_splits(132, 8, 128) == 1                        # too short to be worth splitting
    assert paged_num_splits(132, 8, 4096) == 4096 // configs._PAGED_MIN_TOKENS_PER_SPLIT
    assert paged_num_splits(132, 1, 1 << 20) == configs._PAGED_MAX_SPLITS
    assert paged_num_splits(132, 64, 1 << 16) == 2 * 132 // 64            # one wave of 2 programs per SM: 4, not 5


def test_paged_config_tiles():
    decode = paged_config(90, 128, torch.bfloat16, 16, 4, 1)
    assert decode.block_m == 16                                      # tl.dot minimum, 4 rows used
    assert (decode.block_n, decode.num_warps, decode.num_stages) == (64, 8, 3)    # the H200 sweep's tile (table ahead)
    prefill = paged_config(90, 80, torch.bfloat16, 16, 8, 5)
    assert prefill.block_m == 64 and prefill.block_n == 64            # 40 rows -> 64
    big = paged_config(90, 256, torch.float32, 16, 8, 64)
    assert big.block_m <= 32 and big.block_n <= 32                     # keeps the D=256 tiles small
    wide = paged_config(90, 512, torch.bfloat16, 16, 16, 1)          # MLA's 512-wide accumulator
    assert (wide.block_m, wide.block_n, wide.num_warps) == (16, 32, 8)
    with pytest.raises(ValueError, match="head dims up to 512"):
        paged_config(90, 640, torch.float32, 16, 1, 1)


def test_paged_rejects_bad_num_splits():
    inputs = make_paged_inputs([4], 2, 1, 16, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        paged_forward(*inputs[:5], AttentionParams(0.25, True), alibi_slopes=inputs[5], num_splits=0)


# ---------------------------------------------------------------------------------------------
# GPU: real sizes, compiled kernels
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tq, causal, window, softcap, alibi", [
    (1, True, 0, 0.0, None),
    (1, True, 1024, 0.0, None),
    (16, True, 0, 30.0, "heads"),
    (16, False, 0, 0.0, None),
])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_paged_gpu_real_sizes(dtype, tq, causal, window, softcap, alibi, num_splits):
    torch.manual_seed(1)
    lens = torch.randint(tq, 4096, (8,)).tolist() + [4096, tq]
    inputs = make_paged_inputs(lens, 32, 8, 128, tq, 16, dtype, device="cuda", alibi=alibi)
    run_and_check(inputs, 128 ** -0.5, causal, window, softcap, dtype, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, block_size, q_heads, kv_heads", [
    (64, 8, 8, 8), (80, 32, 32, 4), (256, 128, 16, 1), (96, 64, 28, 4),
])
def test_paged_gpu_shapes(head_dim, block_size, q_heads, kv_heads):
    torch.manual_seed(2)
    lens = torch.randint(1, 3000, (6,)).tolist()
    inputs = make_paged_inputs(lens, q_heads, kv_heads, head_dim, 1, block_size, torch.bfloat16, device="cuda")
    run_and_check(inputs, head_dim ** -0.5, True, 0, 0.0, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tq, splits", [(1, 32), (1, 7), (16, 8)])
def test_paged_gpu_fused_reduce(dtype, tq, splits):
    """On a GPU a tile's split programs run at once, on different SMs. The fused output is deterministic (no atomic
    touches the math), so every call must repeat the first bit for bit; a missed ordering would show now and then
    as a stale partial (the caching allocator hands each call the last call's workspaces, written from the other
    query: calls alternate two), a half-written one, or a tile combined twice or never. Eagerly and replayed from a
    CUDA graph; the counters end at zero."""
    torch.manual_seed(3)
    lens = torch.randint(tq, 4096, (6,)).tolist() + [4096, 0]
    inputs = make_paged_inputs(lens, 32, 8, 128, tq, 16, dtype, device="cuda")
    q, k_cache, v_cache, block_table, seq_lens, _ = inputs
    queries = (q, torch.randn_like(q))
    sinks = torch.randn(32, device="cuda")
    params = AttentionParams(128 ** -0.5, True, empty_rows_nan=True, short_sequences=True)

    def call(query, reduce):
        return paged_forward(query, k_cache, v_cache, block_table, seq_lens, params, sinks=sinks, num_splits=splits,
                             reduce=reduce)

    firsts = [call(query, "fused") for query in queries]
    for query, first in zip(queries, firsts):
        want = reference((query, *inputs[1:]), params, sinks)
        torch.testing.assert_close(first.double(), want, equal_nan=True, atol=TOLERANCE[dtype][0],
                                   rtol=TOLERANCE[dtype][1])
        atol, rtol = (1e-6, 1e-5) if dtype is torch.float32 else TOLERANCE[dtype]   # the splits summed in another order
        torch.testing.assert_close(first, call(query, "separate"), equal_nan=True, atol=atol, rtol=rtol)
    for i in range(100):
        assert torch.equal(call(queries[i % 2], "fused").nan_to_num(7.0), firsts[i % 2].nan_to_num(7.0)), i
    static_q = queries[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(static_q, "fused")
    for i in range(100):
        static_q.copy_(queries[i % 2])
        captured.fill_(float("nan"))
        graph.replay()
        assert torch.equal(captured.nan_to_num(7.0), firsts[i % 2].nan_to_num(7.0)), f"replay {i}"
    assert not launch_paged.split_counters(q.device).any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, block_n, stages", [
    (torch.bfloat16, 128, 2), (torch.bfloat16, 64, 3), (torch.bfloat16, 64, 4), (torch.bfloat16, 128, 3),
    (torch.float32, 128, 2), (torch.float32, 64, 3),   # fp32 128 x 3: two 128x128 K and V buffers do not fit
], ids=lambda x: str(x).replace("torch.", ""))
def test_paged_gpu_table_ahead_and_pdl(dtype, block_n, stages):
    """The block table read a tile ahead (3+ stages: K and V double-buffered) and the reduce by programmatic dependent
    launch (its programs start early and wait in griddepcontrol.wait): against the reference, equal to the plain
    launch of the same tiles, and bit for bit the same over repeated calls, eagerly and replayed from a CUDA graph
    (the caching allocator hands each call the last one's workspaces: a reduce that read before the attention kernel
    finished would see the other query's partials)."""
    torch.manual_seed(4)
    lens = torch.randint(1, 4096, (6,)).tolist() + [4096, 0]
    inputs = make_paged_inputs(lens, 32, 8, 128, 1, 16, dtype, device="cuda")
    q, k_cache, v_cache, block_table, seq_lens, _ = inputs
    queries = (q, torch.randn_like(q))
    params = AttentionParams(128 ** -0.5, True)
    config = KernelConfig(16, block_n, 8, stages)

    def call(query, pdl):
        return paged_forward(query, k_cache, v_cache, block_table, seq_lens, params, num_splits=16, config=config,
                             reduce="separate", pdl=pdl)

    firsts = [call(query, True) for query in queries]
    for query, first in zip(queries, firsts):
        want = reference((query, *inputs[1:]), params, None)
        torch.testing.assert_close(first.double(), want, atol=TOLERANCE[dtype][0], rtol=TOLERANCE[dtype][1])
        atol, rtol = (1e-6, 1e-5) if dtype is torch.float32 else TOLERANCE[dtype]   # another compile of the same math
        torch.testing.assert_close(first, call(query, False), atol=atol, rtol=rtol)
    for i in range(100):
        assert torch.equal(call(queries[i % 2], True), firsts[i % 2]), i
    static_q = queries[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(static_q, True)
    for i in range(100):
        static_q.copy_(queries[i % 2])
        captured.fill_(float("nan"))
        graph.replay()
        assert torch.equal(captured, firsts[i % 2]), f"replay {i}"


# ---------------------------------------------------------------------------------------------
# Bad block tables and lengths (issue 9, items 8-11): never a read outside the tensors, always
# a clear error, from the kernel (interpreter: at once) and from the reference alike
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_report_leaks_into_the_next_test():
    """A bad call's device flags must not surface in a later test of this worker (they are sticky)."""
    from attnlower.lowering import errors

    yield
    errors.clear_errors()


@pytest.fixture
def paged_checks_at_the_call():
    """CUDA reports bad inputs lazily; the debug switch (one sync per call) makes the bad call raise."""
    from attnlower.lowering import errors

    errors.set_paged_checks(True, sync=True)
    yield
    errors.set_paged_checks(True)


def _bad_inputs(case):
    """Inputs of 2 sequences (lengths 17 and 5, block size 8; Tq = 3 for "len < Tq") broken as `case` says."""
    tq = 3 if case == "len < Tq" else 1
    q, k_cache, v_cache, table, lens, _ = make_paged_inputs([17, 5], 4, 2, 16, tq, 8, torch.float32)
    num_blocks, capacity = k_cache.shape[0], table.shape[1] * 8
    table, lens = table.clone(), lens.clone()
    if case == "id == num_blocks":
        table[0, 1] = num_blocks
    elif case == "id huge":
        table[1, 0] = 2**31 - 1
    elif case == "id -1":
        table[0, 2] = -1                      # the third block of a 17-token sequence is in use
    elif case == "len > capacity":
        lens[1] = capacity + 1
    elif case == "len huge":
        lens[0] = 2**31 - 1
    elif case == "len -1":
        lens[1] = -1
    elif case == "len < Tq":
        lens[1] = 2
    return (q, k_cache, v_cache, table, lens), num_blocks, capacity


BAD_CASES = {
    "id == num_blocks": r"sequence 0, a block id outside \[0, num_blocks=\d+\)",
    "id huge": r"sequence 1, a block id outside \[0, num_blocks=\d+\)",
    "id -1": r"sequence 0, a block id outside",
    "len > capacity": r"sequence 1, a seq_len beyond the table's capacity max_blocks \* block_size = \d+",
    "len huge": r"sequence 0, a seq_len beyond the table's capacity",
    "len -1": r"sequence 1, a negative seq_len",
    "len < Tq": r"sequence 1, a seq_len shorter than its Tq=3 queries",
}


_TABLE_AHEAD = KernelConfig(16, 16, 4, 3)   # 3 stages: the kernel reads each tile's block ids one tile ahead
_TABLE_SAME = KernelConfig(16, 16, 4, 2)    # 2 stages: in the tile's own iteration (the plan's decode tiles take 3)


@pytest.mark.parametrize("path", ["kernel", "kernel-table-ahead", "kernel-table-same", "op-kernel", "op-reference"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_tables_and_lengths_raise(case, path, monkeypatch, paged_checks_at_the_call):
    """The bad call itself raises: on CPU always, on CUDA with the sync debug switch (the lazy report is
    test_gpu_bad_table_reported_lazily_without_sync)."""
    from attnlower import PagedInputError, ops

    inputs, _, _ = _bad_inputs(case)
    with pytest.raises(PagedInputError, match=BAD_CASES[case]) as error:
        if path == "kernel":
            paged_forward(*inputs, AttentionParams(0.25, True))
        elif path == "kernel-table-ahead":
            paged_forward(*inputs, AttentionParams(0.25, True), config=_TABLE_AHEAD)
        elif path == "kernel-table-same":
            paged_forward(*inputs, AttentionParams(0.25, True), config=_TABLE_SAME)
        elif path == "op-kernel":  # CPU tensors run the kernel through the interpreter; CUDA tensors always do
            monkeypatch.setenv("ATTNLOWER_CPU_KERNELS", "triton")
            ops.paged_attention(*inputs)
        else:
            ops.paged_attention(*[t.cpu() for t in inputs])
    assert "expected 0 <= seq_len <=" in str(error.value) and "PagedKVCache.block_table" in str(error.value)
    assert "this call" in str(error.value)
    # the error is not sticky: good inputs run again
    good, _, _ = _bad_inputs("none")
    assert torch.isfinite(paged_forward(*good, AttentionParams(0.25, True))).all()


@pytest.mark.parametrize("config", [None, _TABLE_AHEAD, _TABLE_SAME], ids=["plan", "table-ahead", "table-same"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_unchecked_kernel_clamps_its_reads(case, config):
    """With the checks off, bad inputs still never make the kernel read outside its tensors (the
    interpreter would crash on such a read); rows come from the clamped reads, finite."""
    from attnlower.lowering import errors

    inputs, _, _ = _bad_inputs(case)
    errors.set_paged_checks(False)
    try:
        out = paged_forward(*inputs, AttentionParams(0.25, True), num_splits=2, config=config)
    finally:
        errors.set_paged_checks(True)
    assert torch.isfinite(out).all()
    errors.check_errors()  # nothing was recorded


@pytest.mark.parametrize("table_dtype, lens_dtype", [(torch.int64, torch.int32), (torch.int32, torch.int64),
                                                     (torch.float32, torch.int32), (torch.int32, torch.float32)])
def test_bad_index_dtypes_raise(table_dtype, lens_dtype):
    from attnlower import ops

    q, k_cache, v_cache, table, lens = _bad_inputs("none")[0]
    with pytest.raises(ValueError, match=r"expected (block_table|seq_lens) int32"):
        ops.paged_attention(q, k_cache, v_cache, table.to(table_dtype), lens.to(lens_dtype))


@pytest.mark.gpu
def test_gpu_bad_table_reported_lazily_without_sync():
    """CUDA: the call returns (no sync), the next paged call or check_errors() raises, and the CUDA
    context stays usable (no illegal address)."""
    from attnlower import PagedInputError, check_errors, ops

    inputs, _, _ = _bad_inputs("id == num_blocks")
    inputs = [t.cuda() for t in inputs]
    ops.paged_attention(*inputs)
    torch.cuda.synchronize()
    with pytest.raises(PagedInputError, match=r"paged call #\d+ on cuda:\d \(q \[2, 4, 1, 16\]\) \(reported lazily"):
        check_errors()
    good = [t.cuda() for t in _bad_inputs("none")[0]]
    ops.paged_attention(*inputs)
    torch.cuda.synchronize()
    with pytest.raises(PagedInputError, match="sequence 0, a block id outside"):
        ops.paged_attention(*good)
    assert torch.isfinite(ops.paged_attention(*good)).all()


def test_lazy_report_names_the_first_bad_call(monkeypatch):
    """The CUDA path's bookkeeping, run on CPU tensors: each call's flags are copied into its own host slot, so
    a later call names the first one whose copy shows them (its number and shapes), not just "an earlier call"."""
    from attnlower.lowering import errors

    flags = errors._DeviceFlags(torch.device("cpu"))
    flags.attach_ring(torch.zeros((errors._RING, 4), dtype=torch.int32, device="cpu"))   # stands for the pinned ring
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for call in (1, 2):
        flags.before_launch()                       # nothing seen yet
        if call == 2:                               # what the kernel does for a bad call: sticky bits
            flags.flags.copy_(torch.tensor([errors.BAD_BLOCK_ID, 1, 13, 40], dtype=torch.int32, device="cpu"))
        flags.after_launch((2, 4, 1, 16))
    with pytest.raises(errors.PagedInputError, match=r"paged call #2 on cpu \(q \[2, 4, 1, 16\]\) \(reported lazily.*"
                                                     r"ATTNLOWER_PAGED_CHECKS=sync.*sequence 1, a block id outside"):
        flags.before_launch()
    flags.before_launch()                           # reported once, then cleared
    assert int(flags.flags[0]) == 0


def test_batched_reports_copy_once_and_name_the_batch(monkeypatch):
    """Within errors.batched_reports() (a compiled graph's call) the paged calls copy nothing; the flags are copied
    once at its end (the outermost one, when nested), into one slot naming the batch's calls and their shapes, and
    the next call raises. Outside, each call copies as before."""
    from attnlower.lowering import errors

    flags = errors._DeviceFlags(torch.device("cpu"))
    flags.attach_ring(torch.zeros((errors._RING, 4), dtype=torch.int32, device="cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setitem(errors._FLAGS, torch.device("cpu"), flags)
    copies = []
    real_copy = flags._copy
    monkeypatch.setattr(flags, "_copy", lambda entry: copies.append(entry) or real_copy(entry))
    flags.before_launch()
    flags.after_launch((2, 4, 1, 16))                               # call 1, alone: its own copy
    assert copies == [(1, 1, ((2, 4, 1, 16),))]
    with errors.batched_reports():
        with errors.batched_reports():                              # nested: one batch
            for layer in range(3):                                  # calls 2-4, one per layer
                flags.before_launch()
                if layer == 1:                                      # the kernel sets the sticky bits
                    flags.flags.copy_(torch.tensor([errors.BAD_BLOCK_ID, 0, 13, 40], dtype=torch.int32))
                flags.after_launch((2, 4, 1, 16) if layer else (2, 4, 3, 16))
        assert len(copies) == 1 and not flags.host[:, 0].any()      # nothing copied yet
    assert copies[1] == (2, 4, ((2, 4, 3, 16), (2, 4, 1, 16), (2, 4, 1, 16)))
    with pytest.raises(errors.PagedInputError, match=r"one of paged calls #2-#4 on cpu, one compiled graph's call "
                                                     r"\(q \[2, 4, 3, 16\], \[2, 4, 1, 16\]\) \(reported lazily"):
        flags.before_launch()
    with errors.batched_reports():                                  # a batch without paged calls copies nothing
        pass
    assert len(copies) == 2
    with pytest.raises(RuntimeError, match="a layer failed"):      # a call that raises still copies its batch
        with errors.batched_reports():
            flags.after_launch((2, 4, 1, 16))
            raise RuntimeError("a layer failed")
    assert copies[2] == (5, 5, ((2, 4, 1, 16),)) and errors._batch.pending is None


def test_paged_checks_env_values_are_checked(monkeypatch):
    from attnlower.lowering import errors

    monkeypatch.setenv("ATTNLOWER_PAGED_CHECKS", "later")
    with pytest.raises(ValueError, match=r"ATTNLOWER_PAGED_CHECKS: expected 1 .* 0 .* or sync .* got 'later'"):
        errors._mode_from_env()
    monkeypatch.setenv("ATTNLOWER_PAGED_CHECKS", "sync")
    assert errors._mode_from_env() == "sync"
