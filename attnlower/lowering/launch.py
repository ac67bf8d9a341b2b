"""Launchers of the dense attention kernels (`attnlower::flash_attention`,
`attnlower::sliding_window_attention` and their backward) on CUDA, and on CPU under `TRITON_INTERPRET=1`.

The grid, tile configs and constexprs come from one cached plan (`lowering/plan.py`, `dense_plan`);
these functions add the tensors and their strides and launch `kernels/flash_fwd.py` /
`kernels/flash_bwd.py`. Inputs arrive validated by `lowering/ops.py` (docs/INTERFACES.md section 1).
q, k, v, bias and grad_out may have any strides (BSHD views included): nothing here copies them.

The forward launches the Gluon Hopper kernel instead (`launch_gluon.py`) where `plan.choose_forward_kernel`
picks it (sm_90, triton 3.6, D = Dv = 128, no optional feature, long enough: measured faster there) and the
tensors are TMA-readable; never while traced (Inductor's wrap_triton takes no Gluon kernel), never with a
`config` override (that one sets the Triton kernel's tiles), never with ATTNLOWER_GLUON=0.

Graph-safe: no host syncs and no per-call CPU tensors. The dropout seed and base counter are read
by the kernels from `rng_state` (int64 [2] on the device), the way SDPA keeps its philox state, so
the launches can be captured in a CUDA graph. Kernels are launched through `wrap_triton`, so when
the ops are traced (torch.compile) Inductor receives the kernel calls themselves (`lowering/ops.py`).
"""
from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch import Tensor
from torch.library import wrap_triton

from attnlower.lowering import fastpath
from attnlower.lowering import plan as planning
from attnlower.lowering.configs import KernelConfig
from attnlower.lowering.kernels import documents, flash_bwd, flash_fwd
from attnlower.lowering.params import AttentionParams
from attnlower.lowering.reference import out_like


_tracing = threading.local()
log = logging.getLogger(__name__)
_warned: set[str] = set()


@contextlib.contextmanager
def traced_launches():
    """Within: launches are recorded through wrap_triton (the op is being traced, lowering/ops.py).

    Outside (eager calls, tests, benchmarks) kernels launch directly: wrap_triton on real tensors
    would dispatch a higher-order op per launch, which costs far more than the launch itself.
    """
    before = getattr(_tracing, "on", False)
    _tracing.on = True
    try:
        yield
    finally:
        _tracing.on = before


def tracing() -> bool:
    """Whether launches are being traced (lowering/ops.py decomposes the op for Inductor)."""
    return getattr(_tracing, "on", False)


def kernel(module, name: str):
    """`module.name`, wrapped by wrap_triton while the op is traced, raw otherwise."""
    fn = getattr(module, name)
    return wrap_triton(fn) if getattr(_tracing, "on", False) else fn


def _out_like(t: Tensor) -> Tensor:
    """An uninitialized tensor in t's layout (its stride order): outputs follow their input's layout, so a
    BSHD view in gives BSHD memory out and the consumer's transpose + reshape stays a view."""
    return torch.empty_like(t, memory_format=torch.preserve_format)


def _bias_args(bias: Tensor | None, q: Tensor, k: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """(pointer tensor, strides of the bias seen as [B, Hq, Tq, Tk]; 0 on broadcast dims).

    The pointer is the bias itself (the expanded view has its address): a cached launch
    (lowering/fastpath.py) finds it among the call's tensors."""
    if bias is None:
        return q, (0, 0, 0, 0)
    full = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # a view: broadcast dims get stride 0
    return bias, tuple(full.stride())


def _slope_args(alibi_slopes: Tensor | None, q: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(fp32 slopes, (stride over batch, stride over head)); [Hq] slopes get batch stride 0."""
    if alibi_slopes is None:
        return q, (0, 0)
    if alibi_slopes.dim() == 1:
        return alibi_slopes, (0, alibi_slopes.stride(0))
    return alibi_slopes, (alibi_slopes.stride(0), alibi_slopes.stride(1))


def _rng_arg(rng_state: Tensor | None, params: AttentionParams, q: Tensor) -> Tensor:
    """The pointer the kernels read (seed, base counter) from; any tensor when there is no dropout."""
    if params.dropout_p <= 0:
        return q
    if rng_state is None or rng_state.numel() != 2 or rng_state.dtype != torch.int64 \
            or rng_state.device != q.device:
        got = None if rng_state is None else f"{rng_state.dtype} {list(rng_state.shape)} on {rng_state.device}"
        raise ValueError(f"flash kernels: expected rng_state int64 [2] (seed, offset) on {q.device} with "
                         f"dropout_p > 0, got {got}; the ops draw it (lowering/ops.py, draw_rng_state)")
    return rng_state


def _sink_args(sinks: Tensor | None, q: Tensor) -> tuple[Tensor, int]:
    """(sinks pointer, stride over the head); q stands in when there are none (never read)."""
    return (q, 0) if sinks is None else (sinks, sinks.stride(0))


_DOC_BOUNDS_BLOCK = 1024   # positions per program of _doc_bounds_kernel (each also reads the whole row once)


def document_bounds(doc_ids: Tensor) -> Tensor:
    """int32 [B|1, 2, Tk]: per key position the start and (exclusive) end of its run of equal ids, [0, Tk) everywhere
    in a row that is not non-decreasing (kernels/documents.py). One launch on the device, no host read, graph-safe;
    a launcher's own scratch (fully written before the attention kernel reads it), so the call stays cacheable."""
    batch, tk = doc_ids.shape
    bounds = fastpath.scratch(torch.empty((batch, 2, tk), dtype=torch.int32, device=doc_ids.device))
    fastpath.launch(kernel(documents, "_doc_bounds_kernel"), (batch, planning._cdiv(tk, _DOC_BOUNDS_BLOCK), 1),
                    (doc_ids, bounds, *doc_ids.stride(), *bounds.stride(), tk), dict(BLOCK=_DOC_BOUNDS_BLOCK, num_warps=4))
    return bounds


def _doc_args(doc_ids: Tensor | None, q: Tensor) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """(ids, bounds, (ids' batch stride, ids' position stride, bounds' batch stride)); [1, Tk] ids and their
    bounds get batch stride 0. The bounds are computed here on the device (`document_bounds`: one launch), in the
    forward and again in the backward (8 bytes per token, not saved)."""
    if doc_ids is None:
        return q, q, (0, 0, 0)
    bounds = document_bounds(doc_ids)
    one = doc_ids.shape[0] == 1
    return doc_ids, bounds, (0 if one else doc_ids.stride(0), doc_ids.stride(1), 0 if one else bounds.stride(0))


def _verified_arg(verified: Tensor | None, q: Tensor) -> Tensor:
    """The flag's pointer (q stands in when there is none: never read)."""
    return q if verified is None else verified


def _plan(params, direction, q, k, v, bias, alibi_slopes, configs, sinks=None, doc_ids=None,
          verified=None) -> planning.DensePlan:
    return planning.dense_plan(params, direction, planning.Meta.of(q), planning.Meta.of(k), planning.Meta.of(v),
                               planning.Meta.of(bias), alibi_slopes is not None, planning.target_of(q.device),
                               configs, sinks is not None, doc_ids is not None, verified is not None)


def _diag_offset(q: Tensor, k: Tensor, params: AttentionParams) -> int:
    return k.shape[2] - q.shape[2] if params.bottom_right else 0


def flash_forward(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, *, bias: Tensor | None = None,
                  alibi_slopes: Tensor | None = None, rng_state: Tensor | None = None,
                  sinks: Tensor | None = None, doc_ids: Tensor | None = None, verified: Tensor | None = None,
                  config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Dense attention forward (docs/INTERFACES.md, "Semantics (dense ops)") -> (out, lse).

    q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv], any strides. params.window > 0 is the sliding op
    (always causal). Returns out [B, Hq, Tq, Dv] in q's dtype and layout (stride order) and lse fp32
    [B, Hq, Tq] contiguous.
    sinks: float [Hq] logits in the normalizer (lse includes them; a row with no visible key gives 0).
    doc_ids: int [B|1, Tk] document ids (Tq <= Tk): key blocks of other documents are skipped.
    verified: a one-element bool device tensor: True runs params' causal / window / alibi without reading the bias,
    False the bias alone over every block (the kernels read the flag: one launch, no host sync).
    `config` overrides the tiles from configs.flash_config (tests, benchmarks) and keeps the Triton kernel.
    Without it, the Gluon forward runs where plan.choose_forward_kernel picks it and q, k, v are TMA-readable
    (same contract: out in q's layout, lse fp32 contiguous; the backward reads either).
    """
    plan = _plan(params, "fwd", q, k, v, bias, alibi_slopes, (config,) if config is not None else (), sinks, doc_ids,
                 verified)
    batch, q_heads, tq, head_dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    out = out_like(q, v.shape[3])
    if config is None and not plan.trivial:
        choice = planning.choose_forward_kernel(
            params, planning.Meta.of(q), planning.Meta.of(k), planning.Meta.of(v), planning.Meta.of(bias),
            alibi_slopes is not None, planning.target_of(q.device), sinks is not None, doc_ids is not None,
            verified is not None, planning.GLUON_ENABLED, tracing())
        if choice.gluon is not None:
            lse = _gluon_forward(q, k, v, params, choice.gluon, out)
            if lse is not None:
                return out, lse
    lse = torch.empty((batch, q_heads, tq), dtype=torch.float32, device=q.device)
    if plan.trivial == "empty":
        return out, lse
    if plan.trivial == "no_keys":  # every row is empty (with sinks: the sink takes the whole softmax)
        if sinks is not None:
            out.zero_()
            lse.copy_(sinks.float().view(1, q_heads, 1).expand(batch, q_heads, tq))
            return out, lse
        out.fill_(float("nan") if params.empty_rows_nan else 0.0)
        lse.fill_(float("-inf"))
        return out, lse
    (fwd,) = plan.launches
    bias_t, stride_b = _bias_args(bias, q, k)
    slopes, stride_s = _slope_args(alibi_slopes, q)
    sinks_t, stride_sink = _sink_args(sinks, q)
    docs_t, bounds, stride_docs = _doc_args(doc_ids, q)
    fastpath.launch(kernel(flash_fwd, fwd.kernel), fwd.grid, (
        q, k, v, bias_t, slopes, sinks_t, docs_t, bounds, _verified_arg(verified, q), out, lse,
        _rng_arg(rng_state, params, q),
        *q.stride(), *k.stride(), *v.stride(), *stride_b, *stride_s, stride_sink, *stride_docs, *out.stride(),
        q_heads, q_heads // kv_heads, tq, tk,
        params.scale, params.softcap, _diag_offset(q, k, params), params.window, params.dropout_p,
        params.mask_fill,
    ), fwd.launch_kwargs)
    return out, lse


def _gluon_forward(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, config, out: Tensor) -> Tensor | None:
    """The Gluon forward into `out` -> lse; None when the tensors are not TMA-readable (the Triton kernel, which takes
    any strides, runs then) or launch_gluon refuses the call after all (logged once: the router and the launcher
    disagree, which is a bug to report)."""
    from attnlower.lowering import launch_gluon

    if launch_gluon.layout_problem(q=q, k=k, v=v, out=out) is not None:
        return None
    # the cached path would replay the first call's TMA descriptors (its tensors' addresses): not cached
    fastpath.uncacheable("the Gluon forward's TMA descriptors hold the tensors' addresses")
    try:
        _, lse = launch_gluon.gluon_flash_forward(q, k, v, params, config=config, out=out)
    except NotImplementedError as refusal:
        if str(refusal) not in _warned:
            _warned.add(str(refusal))
            log.warning("attnlower: the Gluon forward was chosen (plan.choose_forward_kernel) but refused the call: "
                        "%s; launching the Triton forward instead (ATTNLOWER_GLUON=0 skips the Gluon kernel)", refusal)
        return None
    return lse


def flash_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   params: AttentionParams, *, bias: Tensor | None = None, alibi_slopes: Tensor | None = None,
                   rng_state: Tensor | None = None, bias_requires_grad: bool = False,
                   sinks: Tensor | None = None, sinks_requires_grad: bool = False, doc_ids: Tensor | None = None,
                   verified: Tensor | None = None,
                   config_kv: KernelConfig | None = None, config_q: KernelConfig | None = None,
                   dsinks_rows: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients (dq, dk, dv, dbias, dsinks) of flash_forward, FlashAttention-2 style (kernels/flash_bwd.py).

    dq [B, Hq, Tq, D], dk [B, Hkv, Tk, D], dv [B, Hkv, Tk, Dv] (reduced over the GQA group inside the kernel), each in
    its input's dtype and layout (stride order). dbias (only when bias_requires_grad, float bias) has the bias's
    shape and dtype. Cost of dbias: the kernel writes dS once per (b, h, i, j); a bias of the full
    shape [B, Hq, Tq, Tk] receives it directly, a broadcast bias gets a full fp32 [B, Hq, Tq, Tk]
    buffer (4 bytes per score: B*Hq*Tq*Tk*4 bytes of memory and traffic) summed to its shape afterwards.
    dsinks (only when sinks_requires_grad with sinks): [Hq] in sinks' dtype, from an fp32 [B, Hq, Tq] buffer of
    per-row terms the dQ kernel writes, summed here (`reduce_dsinks`); `dsinks_rows` returns that buffer unsummed
    instead (lowering/ops.py caches the call with it as an output and sums it after the cached launches too).
    `config_kv` / `config_q` override the tiles of the dK/dV and dQ kernels.
    """
    overrides = (config_kv, config_q) if config_kv is not None or config_q is not None else ()
    plan = _plan(params, "bwd", q, k, v, bias, alibi_slopes, overrides, sinks, doc_ids, verified)
    batch, q_heads, tq, head_dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    dq, dk, dv = _out_like(q), _out_like(k), _out_like(v)

    dbias = None
    ds_full = None
    if bias_requires_grad:
        if bias is None or bias.dtype == torch.bool:
            raise ValueError("flash_backward: bias_requires_grad=True needs a float bias, got "
                             f"{None if bias is None else bias.dtype}")
        full_shape = (batch, q_heads, tq, tk)
        # zero-filled: pairs in skipped (causal / window) blocks are never written and have dS = 0
        ds_dtype = bias.dtype if tuple(bias.shape) == full_shape else torch.float32
        ds_full = torch.zeros(full_shape, dtype=ds_dtype, device=q.device)

    want_dsinks = sinks_requires_grad and sinks is not None
    if plan.trivial:
        dq.zero_(), dk.zero_(), dv.zero_()
        if ds_full is not None:
            dbias = ds_full.sum_to_size(bias.shape).to(bias.dtype)
        return dq, dk, dv, dbias, (torch.zeros_like(sinks) if want_dsinks else None)

    pre, dkdv, dq_launch = plan.launches
    bias_t, stride_b = _bias_args(bias, q, k)
    slopes, stride_s = _slope_args(alibi_slopes, q)
    rng = _rng_arg(rng_state, params, q)
    lse = lse.contiguous()  # fp32 [B, Hq, Tq]: ours is already contiguous, this is a no-op then
    group = q_heads // kv_heads
    runtime = (params.scale, params.softcap, _diag_offset(q, k, params), params.window, params.dropout_p,
               params.mask_fill)

    delta = fastpath.scratch(torch.empty((batch, q_heads, tq), dtype=torch.float32, device=q.device))
    # fill mode: the dQ kernel writes each row's normalizer in its frame (kernels/flash_bwd.py), read by dK/dV
    lse_fill = (fastpath.scratch(torch.empty((batch, q_heads, tq), dtype=torch.float32, device=q.device))
                if params.has_fill else delta)
    fastpath.launch(kernel(flash_bwd, pre.kernel), pre.grid, (
        out, grad_out, lse, delta, *out.stride(), *grad_out.stride(), q_heads, tq), pre.launch_kwargs)
    # dQ first: in fill mode it writes lse_fill, which dK/dV reads (otherwise the two are independent)
    sinks_t, stride_sink = _sink_args(sinks, q)
    docs_t, bounds, stride_docs = _doc_args(doc_ids, q)
    # the dQ kernel writes every row's sink term (rows < Tq of every (b, h)): no zero-fill needed
    dsink_rows = torch.empty((batch, q_heads, tq), dtype=torch.float32, device=q.device) if want_dsinks else delta
    fastpath.launch(kernel(flash_bwd, dq_launch.kernel), dq_launch.grid, (
        q, k, v, bias_t, slopes, sinks_t, docs_t, bounds, _verified_arg(verified, q), grad_out, lse, delta, lse_fill,
        dq, dsink_rows, rng,
        *q.stride(), *k.stride(), *v.stride(), *stride_b, *stride_s, stride_sink, *stride_docs, *grad_out.stride(),
        *dq.stride(),
        q_heads, group, tq, tk, *runtime,
    ), dict(dq_launch.launch_kwargs, WRITE_DSINKS=want_dsinks))
    ds_t = ds_full if ds_full is not None else q
    stride_ds = ds_full.stride() if ds_full is not None else (0, 0, 0, 0)
    fastpath.launch(kernel(flash_bwd, dkdv.kernel), dkdv.grid, (
        q, k, v, bias_t, slopes, docs_t, bounds, _verified_arg(verified, q), grad_out, lse, delta, lse_fill, dk, dv,
        ds_t, rng,
        *q.stride(), *k.stride(), *v.stride(), *stride_b, *stride_s, *stride_docs, *grad_out.stride(),
        *dk.stride(), *dv.stride(), *stride_ds,
        q_heads, kv_heads, group, tq, tk, *runtime,
    ), dict(dkdv.launch_kwargs, WRITE_DS=ds_full is not None))
    if ds_full is not None:
        dbias = ds_full if ds_full.dtype == bias.dtype and tuple(bias.shape) == ds_full.shape \
            else ds_full.sum_to_size(bias.shape).to(bias.dtype)
    if not want_dsinks:
        return dq, dk, dv, dbias, None
    return dq, dk, dv, dbias, dsink_rows if dsinks_rows else reduce_dsinks(dsink_rows, sinks)


def reduce_dsinks(rows: Tensor, sinks: Tensor) -> Tensor:
    """The sinks' gradient [Hq] in their dtype from the dQ kernel's fp32 per-row terms [B, Hq, Tq]."""
    return rows.sum(dim=(0, 2)).to(sinks.dtype)
