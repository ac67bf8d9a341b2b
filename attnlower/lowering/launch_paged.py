"""Launcher of the paged-attention Triton kernels (`attnlower::paged_attention` on CUDA, and on
CPU under `TRITON_INTERPRET=1`).

The tiles, the split-KV decision (flash-decoding; from the SM count, the grid size and the table's
width) and the constexprs come from one cached plan (`lowering/plan.py`, `paged_plan`); this adds
the tensors and strides and launches `_paged_attn_kernel`. Split, the partials are combined by
`_paged_reduce_kernel` (a second launch: configs.PAGED_REDUCE, measured faster) or, asked, by the
attention kernel's last split program per tile (the "fused" reduce: one launch, counting finished
splits in `split_counters`).
Inputs arrive validated by `lowering/ops.py` (docs/INTERFACES.md section 1); any strides.

Graph-safe: no host syncs, no per-call CPU tensors, no memset (the fused combine leaves its counters
at zero). Bad block ids and lengths are clamped in the kernel and reported lazily through a device flag
(`lowering/errors.py`).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor

from attnlower.lowering import errors, fastpath
from attnlower.lowering import plan as planning
from attnlower.lowering.configs import PAGED_FUSED_MAX_TILES, KernelConfig
from attnlower.lowering.kernels.paged_decode import _paged_attn_kernel, _paged_reduce_kernel
from attnlower.lowering.params import AttentionParams
from attnlower.lowering.reference import out_like


log = logging.getLogger(__name__)

# The fused combine's tile counters (int32 [configs.PAGED_FUSED_MAX_TILES], zero between launches), one buffer per
# device, allocated at the first split call on it and never replaced or freed: cached launches (lowering/fastpath.py)
# and captured CUDA graphs hold its address for the life of the process. Its limit: calls on one device share it, so
# two split paged calls running at once on two streams of one device would count into the same counters (wrong
# outputs). Not keyed by stream: torch.cuda.graph captures on its own stream, which would then find no counters
# (none may be allocated during a capture). A process that overlaps paged attention on several streams of a device
# keeps the default separate reduce (plan.PAGED_REDUCE: nothing shared).
_COUNTERS: dict[torch.device, Tensor] = {}   # one entry per device used: bounded by the device count


def split_counters(device: torch.device) -> Tensor | None:
    """The tile counters of `device`; None where they cannot be made now: the first split call on a device while
    a CUDA graph is being captured (the buffer would come from the graph's pool, and its zero fill would run only on
    replay). The caller then takes the separate reduce."""
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[device] = torch.zeros(PAGED_FUSED_MAX_TILES, dtype=torch.int32, device=device)
    return counters


def paged_forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                  params: AttentionParams, *, alibi_slopes: Tensor | None = None, sinks: Tensor | None = None,
                  num_splits: int | None = None, config: KernelConfig | None = None,
                  reduce: str | None = None, pdl: bool | None = None) -> Tensor:
    """Paged attention (docs/INTERFACES.md, "Semantics (paged)") -> out [B, Hq, Tq, Dv] in q's layout.

    q [B, Hq, Tq, D]; k_cache [num_blocks, Hkv, block_size, D], v_cache [num_blocks, Hkv, block_size, Dv] (any
    strides: MLA passes a prefix view of the k pool; D <= 576, Dv <= 512); block_table
    [B, max_blocks] int32; seq_lens [B] int32; alibi_slopes None, fp32 [Hq] or [B, Hq]; sinks None or float
    [Hq] (split-KV: added once, by the combine). `params.short_sequences`: a sequence shorter than Tq is computed
    (else an error); rows with no visible key are 0, NaN with `params.empty_rows_nan` (split-KV: decided by the
    combine). `num_splits`, `config`, `reduce` ("fused" / "separate": how split partials are combined) and `pdl`
    (the separate reduce by programmatic dependent launch; see plan.paged_plan) override the heuristics (tests and
    benchmarks); None = choose.
    Raises errors.PagedInputError for a bad table or lengths: at once on CPU; on CUDA at the next
    paged call or `attnlower.check_errors()` (no host sync here).
    """
    checks = errors.paged_checks_enabled()
    planned = (planning.Meta.of(q), planning.Meta.of(k_cache), planning.Meta.of(block_table), alibi_slopes is not None,
               planning.target_of(q.device), checks, num_splits, config, sinks is not None, v_cache.shape[3])
    plan = planning.paged_plan(params, *planned, reduce, pdl)
    counters = split_counters(q.device) if plan.fused else None
    if plan.fused and counters is None:
        log.warning("paged_attention: the first split call on %s runs inside a CUDA graph capture, where the fused "
                    "combine's counters cannot be allocated: this call takes the separate reduce (a second launch); "
                    "make one paged call on the device before capturing to get the fused one", q.device)
        plan = planning.paged_plan(params, *planned, "separate", pdl)
    batch, q_heads, tq, head_dim = q.shape
    num_blocks, kv_heads = k_cache.shape[0], k_cache.shape[1]
    out = out_like(q, v_cache.shape[3])   # q's layout (stride order): a [B, T, H, D] view in gives BSHD memory out
    if plan.trivial:
        return out
    flags = errors.device_flags(q.device) if checks else None
    if flags is not None:
        flags.before_launch()

    if alibi_slopes is not None:
        # [Hq] broadcasts over the batch through a zero batch stride
        stride_ab = alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0
        stride_ah = alibi_slopes.stride(-1)
    else:
        stride_ab = stride_ah = 0

    sinks_t, stride_sink = (sinks, sinks.stride(0)) if sinks is not None else (seq_lens, 0)
    rows_total = batch * q_heads * tq
    if counters is not None:
        fastpath.persistent(counters)
    # the split partials' one workspace (kernels/paged_decode.py, _workspaces): acc, then the m and l planes; one
    # allocation a call, not three
    ws_plane = -(-plan.num_splits * rows_total // 16) * 16
    ws = fastpath.scratch(torch.empty(((v_cache.shape[3] + 2) * ws_plane,), dtype=torch.float32, device=q.device)) \
        if plan.num_splits > 1 else None

    attn = plan.launches[0]
    guard = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        fastpath.launch(_paged_attn_kernel, attn.grid, (
            q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, sinks_t,
            out, ws, counters, flags.flags if flags is not None else seq_lens,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            *block_table.stride(), seq_lens.stride(0),
            stride_ab, stride_ah, stride_sink,
            *out.stride(),
            q_heads, kv_heads, tq, rows_total, ws_plane,
            params.scale, params.softcap, params.window, plan.num_splits, num_blocks, block_table.shape[1],
        ), attn.launch_kwargs)
        if len(plan.launches) > 1:   # the separate reduce
            combine = plan.launches[1]
            fastpath.launch(_paged_reduce_kernel, combine.grid, (
                out, ws, sinks_t, *out.stride(), stride_sink, q_heads, tq, rows_total, ws_plane,
                plan.num_splits), combine.launch_kwargs)
        if flags is not None:
            flags.after_launch(q.shape)
    return out
