"""The document bounds of document mode (packed sequences, issue 21.3), in one launch.

    bounds[b, 0, j], bounds[b, 1, j]: the start and the (exclusive) end of the run of equal ids that key position j
    belongs to in row b of doc_ids [B|1, Tk]; a row whose ids are not non-decreasing gets [0, Tk) at every position
    (no block skipped: the attention kernels still compare ids inside every tile they visit, so any ids are exact).

The attention kernels intersect their block ranges with these (kernels/flash_fwd.py `_doc_key_range`,
kernels/flash_bwd.py `_doc_query_range`). One program per BLOCK positions of a row: it checks the whole row is
non-decreasing (every program reads the row once: Tk / BLOCK row reads in all, L2-resident), then finds each
position's run by binary search over the sorted row (lower and upper bound of its id). No host read, no
data-dependent shape: a CUDA graph captures it and replays it on new ids. It replaced eight small torch ops (a cumsum,
two searchsorted, a cat, a stack, ...) that cost more host time per call than the attention kernel took on the GPU
(bench/modern.py's packed rows, H200, 2026-12-04).
"""
import triton
import triton.language as tl


@triton.jit
def _doc_bounds_kernel(ids_ptr, bounds_ptr, stride_ib, stride_it, stride_bb, stride_bs, stride_bk, tk,
                       BLOCK: tl.constexpr):
    b = tl.program_id(0)
    row = ids_ptr + b.to(tl.int64) * stride_ib
    offs = tl.arange(0, BLOCK)

    # the whole row non-decreasing? (a count of descents, over every BLOCK of the row)
    descents = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(1, tk, BLOCK):
        j = start + offs
        ok = j < tk
        cur = tl.load(row + j * stride_it, mask=ok, other=0)
        prev = tl.load(row + (j - 1) * stride_it, mask=ok, other=0)
        descents += (ok & (cur < prev)).to(tl.int32)
    sorted_row = tl.sum(descents, axis=0) == 0

    j = tl.program_id(1) * BLOCK + offs
    ok = j < tk
    value = tl.load(row + j * stride_it, mask=ok, other=0)
    # lower bound (first position whose id is >= value) and upper bound (first whose id is > value): 31 halvings
    # close any int32 range [lo, hi); once closed a lane's loads are masked off (no memory traffic), so the
    # ceil(log2(tk + 1)) rounds that do work are the ones that cost
    lo_s = tl.zeros([BLOCK], dtype=tl.int32)
    hi_s = lo_s + tk
    lo_e = lo_s
    hi_e = hi_s
    for _ in range(0, 31):
        mid_s = (lo_s + hi_s) // 2
        go_s = lo_s < hi_s
        x_s = tl.load(row + mid_s * stride_it, mask=ok & go_s, other=0)
        right_s = x_s < value
        lo_s = tl.where(go_s & right_s, mid_s + 1, lo_s)
        hi_s = tl.where(go_s & ~right_s, mid_s, hi_s)
        mid_e = (lo_e + hi_e) // 2
        go_e = lo_e < hi_e
        x_e = tl.load(row + mid_e * stride_it, mask=ok & go_e, other=0)
        right_e = x_e <= value
        lo_e = tl.where(go_e & right_e, mid_e + 1, lo_e)
        hi_e = tl.where(go_e & ~right_e, mid_e, hi_e)
    start = tl.where(sorted_row, lo_s, 0)
    end = tl.where(sorted_row, lo_e, tk)
    out = bounds_ptr + b.to(tl.int64) * stride_bb + j * stride_bk
    tl.store(out, start, mask=ok)
    tl.store(out + stride_bs, end, mask=ok)
