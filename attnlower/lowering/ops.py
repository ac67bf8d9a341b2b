"""The attnlower IR ops: `torch.library` custom ops in namespace `attnlower`, defined by lowering/registry.py.

One op per attention family (docs/INTERFACES.md section 1):

    attnlower::flash_attention           dense attention (prefill / training), autograd
    attnlower::sliding_window_attention  causal attention over the `window` most recent keys, autograd
    attnlower::paged_attention           attention over a paged KV cache (inference)
    attnlower::flash_attention_backward  the backward of both dense ops

Their schemas, the autograd glue (what is saved, how the backward op is called, which gradient goes to
which input) and the kernel names come from one `OpDef` per op in `lowering/registry.py`.

Inputs are validated here, once per signature (shapes, dtypes, devices, flags: a bounded cache),
for every implementation (including the fake one, so bad shapes fail at trace time). The flat
schema arguments become one `AttentionParams` (`lowering/params.py`) right here; below this file
everything takes params + tensors. Then CUDA tensors run the Triton launchers (`lowering/launch.py`,
`lowering/launch_paged.py`) and CPU tensors the reference (`lowering/reference.py`), unless
`ATTNLOWER_CPU_KERNELS=triton` asks for the launchers on CPU too (Triton's interpreter). float64
always runs the reference on CPU (the translation validator relies on it). Tensors on other
devices run the reference, which is plain PyTorch. A repeat call on CUDA launches its cached compiled
kernels directly (`lowering/fastpath.py`); plain eager calls that need a gradient use `EAGER_AUTOGRAD`, the
same autograd glue as an autograd.Function over these implementations (no dispatcher).

Outputs follow q's layout: `out` has q's stride order (a [B, T, H, D] view in gives [B, T, H, D] memory out,
so `out.transpose(1, 2).reshape(B, T, H * D)` downstream is a view), and dq / dk / dv their input's; the fake
implementations allocate the same strides (Inductor reads them). No output aliases an input or another output.

How torch.compile sees the ops. The dense ops (and their backward) are `torch.library.triton_op`s:
when AOTAutograd traces them on CUDA tensors they decompose into their launcher, so Inductor receives
`triton_kernel_wrapper_functional` calls and launches the Triton kernels from its own generated code (no
Python op dispatch per call). On by default; ATTNLOWER_INDUCTOR_KERNELS=0 keeps each call one opaque op.
Tensors that run the reference stay one opaque op (the reference reads dropout seeds on the host).
paged_attention stays an opaque custom op: its bounds flags live in a per-device buffer and a pinned
host ring (`lowering/errors.py`) that a traced graph could not hold; it is graph-safe all the same (no
host sync).
"""
import contextlib
import importlib
import math
import operator
import os
import sys
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from attnlower.lowering import errors, fastpath, registry
from attnlower.lowering.env import switch_from_env
from attnlower.lowering.params import AttentionParams
from attnlower.lowering.plan import cached_unless_symbolic, check_dense_head_dims, check_paged_head_dims
from attnlower.lowering import reference  # noqa: F401  the references _run reads by name (registry.OpDef.references)
from attnlower.lowering.reference import out_like

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Seeds stay below 2**31 so a Triton kernel can take them as an int32 argument.
_SEED_LIMIT = 2**31 - 1

# The schemas, derived from the registry (kept as names: docs and tests read them)
FLASH_SCHEMA = registry.FLASH.schema
SLIDING_SCHEMA = registry.SLIDING.schema
PAGED_SCHEMA = registry.PAGED.schema
BACKWARD_SCHEMA = registry.DENSE_BACKWARD.schema
# Test hook: Inductor cannot compile Triton kernels for CPU tensors, so under the interpreter the
# dense ops stay opaque when traced; tests set this to inspect the decomposition on CPU.
TRACE_CPU_KERNELS = False
# Inductor launches the dense kernels itself inside compiled graphs (the triton_op decomposition). It failed on
# an H200 (torch 2.11, 2026-12-01..03) because Inductor types Python floats fp64, which promoted the scores and
# the accumulator past tl.dot's fp32 check; the kernels now cast every float scalar to fp32 at entry
# (kernels/common.py, _as_fp32), and tests/lowering/test_sm90_compile.py compiles every kernel with
# Inductor's typing. ATTNLOWER_INDUCTOR_KERNELS=0 keeps each call one opaque op (the previous behaviour).
INDUCTOR_KERNELS = switch_from_env("ATTNLOWER_INDUCTOR_KERNELS", on="Inductor launches the dense kernels itself",
                                   off="each call stays one opaque op")


# --------------------------------------------------------------------------- dispatch


def _cpu_runs_kernels() -> bool:
    mode = os.environ.get("ATTNLOWER_CPU_KERNELS", "")
    if mode in ("", "reference"):
        return False
    if mode == "triton":
        return True
    raise ValueError(f"ATTNLOWER_CPU_KERNELS: expected 'triton' or 'reference' (or unset), got "
                     f"{mode!r}; set it to 'triton' to run the Triton kernels on CPU tensors "
                     f"through the interpreter")


def _check_interpreter() -> None:
    """ATTNLOWER_CPU_KERNELS=triton needs kernels decorated under TRITON_INTERPRET=1 (Triton decides at import)."""
    from attnlower.lowering.kernels import flash_fwd

    if type(flash_fwd._flash_fwd_kernel).__name__ != "InterpretedFunction":
        raise ValueError("ATTNLOWER_CPU_KERNELS=triton runs the Triton kernels on CPU tensors through Triton's "
                         "interpreter, but this process compiled them for the GPU (TRITON_INTERPRET was not 1 when "
                         "the kernels were imported); move the tensors to the GPU, or set TRITON_INTERPRET=1 before "
                         "importing attnlower")


def _runs_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether tensors on `device` run the Triton launchers (True) or the reference (False)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        # float64 on CPU is the reference's, whatever ATTNLOWER_CPU_KERNELS says (the invariant
        # the translation validator relies on); the variable is still validated.
        return _cpu_runs_kernels() and dtype != torch.float64
    return False


def _launcher(module_name: str, function_name: str, op_name: str) -> Callable:
    """Import a launcher lazily: the launchers import triton, which CPU-only users never need."""
    module = sys.modules.get(module_name)  # once imported: a dict lookup, not the import machinery
    if module is not None:
        launcher = getattr(module, function_name, None)
        if launcher is not None:
            return launcher
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:  # the launcher exists but one of its imports is missing
            raise
        module = None
    launcher = getattr(module, function_name, None)
    if launcher is None:
        raise NotImplementedError(
            f"attnlower::{op_name} has no Triton kernel yet for CUDA tensors (or CPU tensors with "
            f"ATTNLOWER_CPU_KERNELS=triton): {module_name}.{function_name} does not exist. Run on "
            f"CPU tensors without ATTNLOWER_CPU_KERNELS to use the reference implementation.")
    return launcher


# --------------------------------------------------------------------------- validation


class _Meta(NamedTuple):
    """What validation reads from a tensor; hashable (the validation cache's key) for static shapes."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device

    def dim(self) -> int:
        return len(self.shape)


def _meta(t: Tensor | None) -> _Meta | None:
    return None if t is None else _Meta(t.shape, t.dtype, t.device)


def _shape(t) -> list:
    return list(t.shape)


def _check_float_dtype(op: str, name: str, t: _Meta, runs_kernels: bool) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"attnlower::{op}: expected {name} of dtype float16, bfloat16, float32 or "
                         f"float64, got {t.dtype}; cast it with {name}.to(torch.float16) (or another "
                         f"float dtype)")
    if runs_kernels and t.dtype == torch.float64:
        where = "CUDA tensors" if t.device.type == "cuda" else "ATTNLOWER_CPU_KERNELS=triton"
        raise ValueError(f"attnlower::{op}: expected {name} of dtype float16, bfloat16 or float32 "
                         f"for the Triton kernels ({where}), got float64; compute in float32, or "
                         f"run float64 on CPU tensors through the reference implementation")


def _check_float_inputs(op: str, named: dict[str, _Meta], runs_kernels: bool, fix: str) -> None:
    """Each of `named` of a float dtype the path can run (_check_float_dtype), and all of one dtype (`fix`: how to
    get there)."""
    for name, t in named.items():
        _check_float_dtype(op, name, t, runs_kernels)
    dtypes = [t.dtype for t in named.values()]
    if len(set(dtypes)) > 1:
        raise ValueError(f"attnlower::{op}: expected {', '.join(named)} of one dtype, got "
                         f"{', '.join(str(d) for d in dtypes)}; {fix}")


def _check_devices(op: str, named: dict[str, Tensor | None]) -> None:
    devices = {name: t.device for name, t in named.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"attnlower::{op}: expected every tensor on one device, got "
                             f"{first_name} on {first} and {name} on {device}; move them with "
                             f".to({str(first)!r})")


def _check_rank(op: str, name: str, t: Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        hint = (" (a [B, T, H, D] tensor needs .transpose(1, 2))" if rank == 4 and "B" in layout
                else "")
        raise ValueError(f"attnlower::{op}: expected {name} of rank {rank} {layout}, got shape "
                         f"{_shape(t)}{hint}")


def _check_heads(op: str, q_heads, kv_heads) -> None:
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"attnlower::{op}: expected the query head count to be a multiple of the "
                         f"KV head count (GQA: query head h reads KV head h // (Hq // Hkv)), got "
                         f"Hq={q_heads} and Hkv={kv_heads}; repeat the KV heads or fix the head split")


def _check_alibi(op: str, alibi_slopes: Tensor | None, batch, q_heads) -> None:
    if alibi_slopes is None:
        return
    shape = _shape(alibi_slopes)
    if shape != [q_heads] and shape != [batch, q_heads]:
        raise ValueError(f"attnlower::{op}: expected alibi_slopes of shape [Hq]={[q_heads]} or "
                         f"[B, Hq]={[batch, q_heads]}, got {shape}; pass one slope per query head")
    if alibi_slopes.dtype != torch.float32:
        raise ValueError(f"attnlower::{op}: expected alibi_slopes of dtype float32, got "
                         f"{alibi_slopes.dtype}; pass alibi_slopes.float()")


def _check_scalars(op: str, scale: float | None, softcap: float, dropout_p: float) -> None:
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"attnlower::{op}: expected a finite scale (or None for 1/sqrt(D)), got {scale}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"attnlower::{op}: expected softcap >= 0 (0 disables it), got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attnlower::{op}: expected dropout_p in [0, 1), got {dropout_p}; pass 0.0 "
                         f"outside training")


def _check_bias(op: str, bias: Tensor | None, target: list) -> None:
    if bias is None:
        return
    if bias.dtype != torch.bool and not bias.dtype.is_floating_point:
        raise ValueError(f"attnlower::{op}: expected bias of dtype bool (True = keep) or a float "
                         f"dtype (added to the scores), got {bias.dtype}; convert an integer mask "
                         f"with mask.bool()")
    shape = _shape(bias)
    broadcastable = len(shape) <= 4 and all(
        size == 1 or size == want for size, want in zip(reversed(shape), reversed(target)))
    if not broadcastable:
        raise ValueError(f"attnlower::{op}: expected bias broadcastable to [B, Hq, Tq, Tk]={target}, "
                         f"got shape {shape}; each dim must equal the target's or be 1")


def _check_sinks(op: str, sinks, q_heads) -> None:
    if sinks is None:
        return
    if _shape(sinks) != [q_heads]:
        raise ValueError(f"attnlower::{op}: expected sinks of shape [Hq]={[q_heads]} (one logit per query head), got "
                         f"{_shape(sinks)}; a per-KV-head sink repeats over its group: "
                         f"sinks.repeat_interleave(Hq // Hkv)")
    if not sinks.dtype.is_floating_point:
        raise ValueError(f"attnlower::{op}: expected sinks of a float dtype (any: read as float32), got {sinks.dtype}; "
                         f"pass sinks.float()")


def _check_doc_ids(op: str, doc_ids, batch, tq, tk) -> None:
    if doc_ids is None:
        return
    shape = _shape(doc_ids)
    if len(shape) != 2 or shape[0] not in (batch, 1) or shape[1] != tk:
        raise ValueError(f"attnlower::{op}: expected doc_ids of shape [B, Tk]={[batch, tk]} (or [1, Tk]), got {shape}; "
                         f"one document id per key position")
    if doc_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"attnlower::{op}: expected doc_ids of dtype int32 or int64, got {doc_ids.dtype}; pass "
                         f"position-derived ids (attnlower.ops.doc_ids_from_position_ids) or ids.to(torch.int32)")
    if tq > tk:
        raise ValueError(f"attnlower::{op}: doc_ids needs Tq <= Tk (query i is key position i + off and takes that "
                         f"position's document), got Tq={tq}, Tk={tk}")


def _check_verified(op: str, verified, bias) -> None:
    if verified is None:
        return
    if verified.dtype != torch.bool or math.prod(verified.shape) != 1:
        raise ValueError(f"attnlower::{op}: expected verified a one-element bool tensor (the device-side check that "
                         f"the proven structure still holds), got {verified.dtype} {_shape(verified)}")
    if bias is None:
        raise ValueError(f"attnlower::{op}: verified needs the source's mask as bias (what runs when verified is "
                         f"False), got bias=None")


def _check_fill(op: str, fill: float | None) -> None:
    if fill is not None and (math.isnan(fill) or fill == math.inf):
        raise ValueError(f"attnlower::{op}: expected fill a finite float (the value masked scores take) or None / "
                         f"-inf (masking), got {fill}")


def validate_dense(op: str, bound: dict) -> bool:
    """Check the inputs of a dense op (its arguments by name, `OpDef.bind`'s dict); returns whether they run
    the Triton kernels.

    Raises ValueError saying what was expected, what came, and what to do (NotImplementedError for a limit of
    the kernels, naming the fallback). Cached per (shapes, dtypes, devices, scalars): a repeat call costs one
    lookup. The fake implementations call it too, so bad inputs fail at trace time.
    """
    q = bound["q"]
    runs_kernels = _runs_kernels(q.device, q.dtype)
    _validate_dense(op, _meta(q), _meta(bound["k"]), _meta(bound["v"]), _meta(bound["bias"]),
                    _meta(bound["alibi_slopes"]), bound["scale"], bound["softcap"], bound["dropout_p"],
                    _meta(bound.get("sinks")), _meta(bound.get("doc_ids")), bound.get("fill"),
                    _meta(bound.get("verified")), runs_kernels)
    return runs_kernels


@cached_unless_symbolic   # validation runs once per signature, like the plans
def _validate_dense(op, q, k, v, bias, alibi_slopes, scale, softcap, dropout_p, sinks, doc_ids, fill, verified,
                    runs_kernels) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_rank(op, name, t, 4, "[B, H, T, D]")
    _check_devices(op, {"q": q, "k": k, "v": v, "bias": bias, "alibi_slopes": alibi_slopes, "sinks": sinks,
                        "doc_ids": doc_ids, "verified": verified})
    _check_float_inputs(op, {"q": q, "k": k, "v": v}, runs_kernels, fix="cast k and v to q.dtype")
    batch, q_heads, tq, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"attnlower::{op}: expected q, k, v with one batch size, got q {_shape(q)}, "
                         f"k {_shape(k)}, v {_shape(v)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"attnlower::{op}: expected k and v with the same heads and length "
                         f"[B, Hkv, Tk, *], got k {_shape(k)} and v {_shape(v)}")
    if k.shape[3] != head_dim:
        raise ValueError(f"attnlower::{op}: expected k's head_dim to equal q's ({head_dim}), got "
                         f"q {_shape(q)} and k {_shape(k)}")
    if runs_kernels:   # the kernels' limits (NotImplementedError naming them and the fallback), also at trace time
        check_dense_head_dims(head_dim, v.shape[3])
    _check_heads(op, q_heads, k.shape[1])
    _check_bias(op, bias, [batch, q_heads, tq, k.shape[2]])
    _check_alibi(op, alibi_slopes, batch, q_heads)
    _check_sinks(op, sinks, q_heads)
    _check_doc_ids(op, doc_ids, batch, tq, k.shape[2])
    _check_verified(op, verified, bias)
    _check_scalars(op, scale, softcap, dropout_p)
    _check_fill(op, fill)


def check_window_type(op: str, window) -> None:
    """A window is a Python int (not a float, bool or tensor): say so before the schema's raw error."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise ValueError(f"attnlower::{op}: expected window as an int (a number of keys), got "
                         f"{type(window).__name__} {window!r}; pass int(window)")


def validate_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                   seq_lens: Tensor, alibi_slopes: Tensor | None, scale: float | None,
                   window: int, softcap: float, sinks: Tensor | None = None) -> bool:
    """Check the inputs of `paged_attention`; returns whether they run the Triton kernel.

    Checks what the host knows (shapes, dtypes, devices, scalars), cached per signature. The
    values of block_table and seq_lens live on the device: the kernel checks them (lowering/errors.py).
    """
    runs_kernels = _runs_kernels(q.device, q.dtype)
    _validate_paged(_meta(q), _meta(k_cache), _meta(v_cache), _meta(block_table), _meta(seq_lens),
                    _meta(alibi_slopes), scale, window, softcap, _meta(sinks), runs_kernels)
    return runs_kernels


@cached_unless_symbolic   # validation runs once per signature, like the plans
def _validate_paged(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, scale, window, softcap, sinks,
                    runs_kernels) -> None:
    op = "paged_attention"
    _check_rank(op, "q", q, 4, "[B, Hq, Tq, D]")
    _check_rank(op, "k_cache", k_cache, 4, "[num_blocks, Hkv, block_size, D]")
    _check_rank(op, "v_cache", v_cache, 4, "[num_blocks, Hkv, block_size, D]")
    _check_devices(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": block_table,
                        "seq_lens": seq_lens, "alibi_slopes": alibi_slopes, "sinks": sinks})
    _check_float_inputs(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache}, runs_kernels,
                        fix="cast q to the cache's dtype")
    batch, q_heads, _, head_dim = q.shape
    if list(k_cache.shape[:3]) != list(v_cache.shape[:3]):
        raise ValueError(f"attnlower::{op}: expected k_cache and v_cache with the same "
                         f"[num_blocks, Hkv, block_size], got {_shape(k_cache)} and {_shape(v_cache)}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"attnlower::{op}: expected k_cache's head_dim to equal q's ({head_dim}), "
                         f"got q {_shape(q)} and k_cache {_shape(k_cache)}")
    if runs_kernels:
        check_paged_head_dims(head_dim, v_cache.shape[3])
    _check_heads(op, q_heads, k_cache.shape[1])
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"attnlower::{op}: expected block_table int32 [B, max_blocks] with B={batch}, "
                         f"got {block_table.dtype} {_shape(block_table)}; build it with "
                         f"PagedKVCache.block_table(...) or .to(torch.int32)")
    if seq_lens.dtype != torch.int32 or _shape(seq_lens) != [batch]:
        raise ValueError(f"attnlower::{op}: expected seq_lens int32 [B]={[batch]}, got "
                         f"{seq_lens.dtype} {_shape(seq_lens)}; build it with "
                         f"PagedKVCache.seq_lens(...) or .to(torch.int32)")
    if window < 0:
        raise ValueError(f"attnlower::{op}: expected window >= 0 (0 = no window), got {window}")
    _check_alibi(op, alibi_slopes, batch, q_heads)
    _check_sinks(op, sinks, q_heads)
    _check_scalars(op, scale, softcap, 0.0)


def _check_window(window: int) -> None:
    if window <= 0:
        raise ValueError(f"attnlower::sliding_window_attention: expected window > 0 (keys visible "
                         f"from query i: i - window < j <= i), got {window}; use flash_attention "
                         f"with causal=True for no window")


# --------------------------------------------------------------------------- implementations


def draw_rng_state(q: Tensor, dropout_p: float) -> Tensor:
    """int64 [2] (seed, base counter) on q's device; empty without dropout.

    Drawn on the device from its default generator (torch.cuda.manual_seed governs CUDA runs) and
    read there by the kernels: no host sync, and CUDA graphs capture the draw the way they capture
    any random op (graph-safe philox state), so each replay draws a fresh mask. Without dropout a fresh
    empty tensor (never a shared one: no output aliases another)."""
    if dropout_p == 0:
        if type(q) is Tensor:   # Inductor's allocator bypasses the dispatcher: never while tracing (FakeTensor, ...)
            return fastpath.alloc((0,), (1,), torch.int64, q.device)
        return q.new_empty((0,), dtype=torch.int64)
    return torch.randint(0, _SEED_LIMIT, (2,), dtype=torch.int64, device=q.device)


def _dense_params(op: registry.OpDef, q: Tensor, bound: dict) -> AttentionParams:
    return AttentionParams.resolve(
        q.shape[-1], bound["scale"], causal=bool(op.param(bound, "causal", False)),
        bottom_right=bool(bound["bottom_right"]), window=int(op.param(bound, "window", 0)),
        softcap=float(bound["softcap"]), dropout_p=float(bound["dropout_p"]),
        empty_rows_nan=bool(bound["empty_rows_nan"]),
        mask_fill=float("-inf") if bound.get("fill") is None else float(bound["fill"]))


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run(op: registry.OpDef, direction: str, runs_kernels: bool, device: torch.device) -> Callable:
    """The launcher (Triton) or the reference of `op` in `direction`, as the registry names them."""
    if runs_kernels and device.type == "cpu" and not _tracing():
        _check_interpreter()
    module, function = (op.launchers if runs_kernels else op.references)[direction]
    return _launcher(module, function, op.name) if runs_kernels else getattr(sys.modules[module], function)


def _dense_forward(op: registry.OpDef, bound: dict, fast=None):
    """One dense forward call through the launcher (or the reference); `fast`: its fastpath.call_key, to cache
    the launches it makes."""
    q, k, v = bound["q"], bound["k"], bound["v"]
    runs_kernels = validate_dense(op.name, bound)
    params = _dense_params(op, q, bound)
    rng_state = draw_rng_state(q, params.dropout_p)
    forward = _run(op, "forward", runs_kernels, q.device)
    # every optional tensor argument travels as a keyword of the launcher / reference (bias=, alibi_slopes=, ...)
    optional = {a.name: bound[a.name] for a in op.args if a.type == "Tensor?"}
    records: list = []
    with _device_guard(q.device), fastpath.recording(records):
        out, lse = forward(q, k, v, params, rng_state=rng_state, **optional)
    if fast is not None and runs_kernels:
        inputs = tuple(bound[a.name] for a in op.args if a.is_tensor) + (rng_state,)
        fastpath.remember(fast[0], records, inputs, (out, lse), extra=params.dropout_p)
    return out, lse, rng_state


def _dense_cached(call: fastpath.CachedCall, q: Tensor, pointers: list):
    """A repeat dense call: draw the dropout state (its own launch; its pointer follows the call's tensors'),
    then the cached kernel launch."""
    rng_state = draw_rng_state(q, call.extra)
    pointers.append(rng_state.data_ptr())
    out, lse = call(pointers, q.device)
    return out, lse, rng_state


def _tracing() -> bool:
    tracing = getattr(sys.modules.get("attnlower.lowering.launch"), "tracing", None)
    return tracing is not None and tracing()


def _dense_fake(op: registry.OpDef, bound: dict):
    q, v = bound["q"], bound["v"]
    validate_dense(op.name, bound)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    rng_state = q.new_empty((2 if bound["dropout_p"] > 0 else 0,), dtype=torch.int64)
    return out_like(q, v.shape[3]), lse, rng_state


def _traces_into_kernels(args) -> bool:
    """Whether a traced call on these arguments decomposes into its Triton kernel launches."""
    t = next(a for a in args if isinstance(a, Tensor))
    if t.device.type == "cuda":
        return INDUCTOR_KERNELS and t.dtype != torch.float64
    return TRACE_CPU_KERNELS and _runs_kernels(t.device, t.dtype)


def _decompose_when_traced(op_def, body: Callable) -> None:
    """Under FunctionalTensorMode (AOTAutograd), inline the op's launcher where it runs kernels.

    This replaces the rule `triton_op` registers, which would trace every call into its body: the
    reference path reads dropout seeds on the host, so it must stay one opaque op when traced.
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    try:  # torch.export keeps triton ops whole (serializable); absent on older torch
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        def custom_triton_ops_decomposition_disabled():
            return False

    def decompose(mode, op, types, args, kwargs):
        if any(not issubclass(t, FakeTensor) and t not in (Tensor, FunctionalTensor) for t in types):
            return NotImplemented
        if custom_triton_ops_decomposition_disabled() or not _traces_into_kernels(list(args) + list(kwargs.values())):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        from attnlower.lowering.launch import traced_launches

        with mode, traced_launches():
            return body(*args, **kwargs)

    op_def.register_torch_dispatch(FunctionalTensorMode, decompose)


def _cached_launch_lookup(op: registry.OpDef) -> Callable:
    """`lookup(args, kwargs) -> (args, fast, call)` for a dense op's implementation: the arguments in schema order,
    the call's fastpath key (None when fastpath is off or the call has none) and the cached launch to run instead
    of the implementation (None unless one is cached and no hook wants to see the call)."""
    count = len(op.args)
    tensors = operator.itemgetter(*(i for i, a in enumerate(op.args) if a.is_tensor))
    scalars = operator.itemgetter(*(i for i, a in enumerate(op.args) if not a.is_tensor))

    def lookup(args: tuple, kwargs: dict) -> tuple:
        if kwargs or len(args) != count:
            args = tuple(op.bind(args, kwargs).values())
        if not fastpath.ENABLED:
            return args, None, None
        fast = fastpath.call_key(op.name, scalars(args), tensors(args))
        if fast is None:
            return args, None, None
        call = fastpath.lookup(fast[0])
        if call is not None and fastpath.hooks_active():
            call = None
        return args, fast, call

    return lookup


def _dense_forward_impl(op: registry.OpDef) -> Callable:
    """The implementation of a dense forward op, read off its registry entry: `impl(*args, **kwargs)` in schema
    order, returns (out, lse, rng_state). A repeat call of a known signature on CUDA launches its cached kernel
    (lowering/fastpath.py) before anything else runs; its key holds every tensor and scalar argument."""
    names = op.arg_names
    cached_launch = _cached_launch_lookup(op)
    has_window = "window" in names

    def impl(*args, **kwargs):
        args, fast, call = cached_launch(args, kwargs)
        if call is not None:
            return _dense_cached(call, args[0], fast[1])
        bound = dict(zip(names, args))
        if has_window:
            _check_window(bound["window"])
        return _dense_forward(op, bound, fast)

    impl.__name__ = impl.__qualname__ = op.name
    impl.__doc__ = f"attnlower::{op.name}: {op.doc}; returns (out, lse, rng_state). Schema: {op.schema}"
    impl.__signature__ = op.signature()
    return impl


# The implementations the ops are registered with (and attnlower.ops calls directly): flash_attention(q, k, v,
# bias=None, alibi_slopes=None, scale=None, causal=False, ...), as docs/INTERFACES.md section 1 and the registry say.
flash_attention = _dense_forward_impl(registry.FLASH)
sliding_window_attention = _dense_forward_impl(registry.SLIDING)


def _copy_like(like: Tensor, value: Tensor) -> Tensor:
    """`value` in `like`'s layout (the reference computes contiguous results; the kernels write in place)."""
    if value.stride() == like.stride():
        return value
    return torch.empty_like(like, dtype=value.dtype).copy_(value)


def _dense_backward(op: registry.OpDef, bound: dict, fast=None):
    q, k, v = bound["q"], bound["k"], bound["v"]
    runs_kernels = validate_dense(op.name, bound)
    params = _dense_params(op, q, bound)
    backward = _run(op, "backward", runs_kernels, q.device)
    # the optional tensors and the *_requires_grad flags travel as keywords (bias=, sinks=, sinks_requires_grad=, ...)
    optional = {a.name: bound[a.name] for a in op.args if a.type == "Tensor?" or a.name.endswith("_requires_grad")}
    if runs_kernels:   # the sinks' per-row terms come back unsummed: a cached call returns them as its 4th output
        optional["dsinks_rows"] = True
    records: list = []
    with _device_guard(q.device), fastpath.recording(records):
        dq, dk, dv, dbias, dsinks = backward(bound["grad_out"], q, k, v, bound["out"], bound["lse"], params,
                                             rng_state=bound["rng_state"], **optional)
    rows = (dsinks,) if runs_kernels and dsinks is not None else ()
    # a bias gradient is reduced after the kernels from a zero-filled buffer: never a cached launch
    if fast is not None and runs_kernels and dbias is None:
        fastpath.remember(fast[0], records, tuple(bound[a.name] for a in op.args if a.is_tensor), (dq, dk, dv, *rows))
    if rows:
        from attnlower.lowering.launch import reduce_dsinks   # imported already: the kernels just ran

        dsinks = reduce_dsinks(rows[0], bound["sinks"])
    if not runs_kernels:
        dq, dk, dv = _copy_like(q, dq), _copy_like(k, dk), _copy_like(v, dv)
    return (dq, dk, dv, dbias if dbias is not None else q.new_empty((0,)),
            dsinks if dsinks is not None else q.new_empty((0,)))


def _dense_backward_impl(op: registry.OpDef) -> Callable:
    """The implementation of the dense backward op: gradients (dq, dk, dv, dbias, dsinks), each in its input's
    layout; dbias is an empty tensor unless bias_requires_grad with a float bias, dsinks unless sinks_requires_grad
    with sinks (a triton_op returns no optional tensor).
    A repeat call of a known signature without a bias gradient launches its three cached kernels, then sums the sinks'
    per-row terms when it has sinks to differentiate (the bias gradient's buffer must start zeroed and be reduced
    afterwards: that call takes the launcher's path)."""
    names = op.arg_names
    cached_launch = _cached_launch_lookup(op)
    sinks_at = names.index("sinks")

    def impl(*args, **kwargs):
        args, fast, call = cached_launch(args, kwargs)
        if call is not None:
            q = args[1]
            dq, dk, dv, *rows = call(fast[1], q.device)
            if rows:   # sinks_requires_grad: the dQ kernel's per-row sink terms, summed as the launcher sums them
                from attnlower.lowering.launch import reduce_dsinks   # imported already: it made this cached call

                dsinks = reduce_dsinks(rows[0], args[sinks_at])
            else:
                dsinks = fastpath.alloc((0,), (1,), q.dtype, q.device)
            return dq, dk, dv, fastpath.alloc((0,), (1,), q.dtype, q.device), dsinks
        return _dense_backward(op, dict(zip(names, args)), fast)

    impl.__name__ = impl.__qualname__ = op.name
    impl.__doc__ = f"attnlower::{op.name}: {op.doc}. Schema: {op.schema}"
    impl.__signature__ = op.signature()
    return impl


flash_attention_backward = _dense_backward_impl(registry.DENSE_BACKWARD)


def _dense_backward_fake(op: registry.OpDef, bound: dict):
    q, k, v, bias, sinks = bound["q"], bound["k"], bound["v"], bound["bias"], bound["sinks"]
    validate_dense(op.name, bound)
    if bound["bias_requires_grad"] and bias is not None and bias.dtype != torch.bool:
        dbias = bias.new_empty(bias.shape)
    else:
        dbias = q.new_empty((0,))
    dsinks = sinks.new_empty(sinks.shape) if bound["sinks_requires_grad"] and sinks is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias, dsinks


_IMPLS = {"flash_attention": flash_attention, "sliding_window_attention": sliding_window_attention,
          "flash_attention_backward": flash_attention_backward}


def _signature(schema) -> tuple:
    """Argument names, types and defaults and the return types of a schema (return names aside)."""
    return (tuple((a.name, str(a.type), a.default_value) for a in schema.arguments),
            tuple(str(r.type) for r in schema.returns))


def _register_dense_ops():
    """Register the dense ops as triton_ops with the registry's schemas; their fakes from the same entries."""
    ops = {}
    for name, fn in _IMPLS.items():
        spec = registry.OPS[name]
        op_def = torch.library.triton_op(spec.qualname, fn, mutates_args=(), schema=spec.schema)
        got = op_def._opoverload._schema   # triton_op infers the schema from fn's signature (the registry's)
        if _signature(got) != _signature(torch._C.parse_schema(f"{spec.qualname}{spec.schema}")):
            raise RuntimeError(f"{spec.qualname}: the registered schema ({got}) differs from the registry's "
                               f"({spec.schema}); fix OpDef.signature in lowering/registry.py")
        _decompose_when_traced(op_def, fn)
        fake = _dense_backward_fake if spec.family == "dense_backward" else _dense_fake

        def fake_impl(*args, _spec=spec, _fake=fake, **kwargs):
            bound = _spec.bind(args, kwargs)
            if "window" in _spec.arg_names and _spec.family == "dense":
                _check_window(bound["window"])
            return _fake(_spec, bound)

        op_def.register_fake(fake_impl)
        ops[name] = op_def
    return ops


_DENSE_OPS = _register_dense_ops()
_flash_op, _sliding_op, _backward_op = (_DENSE_OPS[n] for n in _IMPLS)


def paged_attention_impl(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes=None, scale=None,
                         causal=True, window=0, softcap=0.0, sinks=None, empty_rows_nan=None):
    """Attention over a paged KV cache; returns out [B, Hq, Tq, Dv] in q's layout. Inference only."""
    tensors = (q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, sinks)
    fast = None
    if fastpath.ENABLED:  # a repeat call of a known signature: the cached launches (lowering/fastpath.py)
        fast = fastpath.call_key("paged_attention", (scale, causal, window, softcap, empty_rows_nan,
                                                     errors.paged_checks_mode()), tensors)
        if fast is not None:
            call = fastpath.lookup(fast[0])
            if call is not None and not fastpath.hooks_active():
                flags = call.extra
                if flags is not None:
                    flags.before_launch()
                (out,) = call(fast[1], q.device)
                if flags is not None:
                    flags.after_launch(q.shape)
                return out
    runs_kernels = validate_paged(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, scale,
                                  window, softcap, sinks)
    params = AttentionParams.resolve(q.shape[-1], scale, causal=bool(causal), window=int(window),
                                     softcap=float(softcap),
                                     empty_rows_nan=bool(empty_rows_nan), short_sequences=empty_rows_nan is not None)
    forward = _run(registry.PAGED, "forward", runs_kernels, q.device)
    records: list = []
    with fastpath.recording(records):
        out = forward(q, k_cache, v_cache, block_table, seq_lens, params, alibi_slopes=alibi_slopes, sinks=sinks)
    if fast is not None and runs_kernels:
        flags = errors.device_flags(q.device) if errors.paged_checks_enabled() else None
        fastpath.remember(fast[0], records, tensors, (out,), (flags.flags,) if flags is not None else (), flags)
    return out


# paged_attention is defined through torch.library.Library rather than custom_op: its kernel is then called by
# the C++ dispatcher directly, without custom_op's Python layers (the autograd wrapper, the redispatch, the
# aliasing check: ~11 us of a no-op custom op's 12 on a 2-core CPU, 2026-12-03, against ~3 us this way; 48 us of
# torch.ops.attnlower.flash_attention's 150 on an H200 host, /work/gpu-logs/call1). It is an inference op: no
# autograd formula (the autograd fallback lets a call through and warns if a gradient is ever asked of it).
_LIB = torch.library.Library("attnlower", "FRAGMENT")  # noqa: TOR901 - the other ops are registered by triton_op
_LIB.define(f"{registry.PAGED.name}{registry.PAGED.schema}")
_LIB.impl(registry.PAGED.name, paged_attention_impl, "CompositeExplicitAutograd")
paged_attention = getattr(torch.ops.attnlower, registry.PAGED.name)


@torch.library.register_fake(registry.PAGED.qualname)
def _paged_attention_fake(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes=None,
                          scale=None, causal=True, window=0, softcap=0.0, sinks=None, empty_rows_nan=None):
    validate_paged(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, scale, window, softcap, sinks)
    return out_like(q, v_cache.shape[3])


# --------------------------------------------------------------------------- autograd (from the registry)


def _needs_grad(ctx, index: int) -> bool:
    # needs_input_grad covers only the arguments the call passed: defaults left out are absent
    return index < len(ctx.needs_input_grad) and bool(ctx.needs_input_grad[index])


def _autograd(op: registry.OpDef, call_backward: Callable) -> tuple[Callable, Callable]:
    """(setup_context, backward) of a differentiable op, read off its registry entry and its backward's.

    The backward op's arguments are filled by name: grad_out; a tensor the forward read or wrote (saved);
    an AttentionParams field (the forward's argument, or what the op fixes); `<input>_requires_grad` flags
    (whether that input wants a gradient). Its returns are the gradients of the inputs `grads` names.
    `call_backward(*args)` runs the backward op (the dispatcher's op, or its implementation directly)."""
    back = registry.OPS[op.backward]
    saved = tuple(a.name for a in back.args if a.is_tensor and a.name != "grad_out")
    flags = {a.name: a.name[:-len("_requires_grad")] for a in back.args if a.name.endswith("_requires_grad")}
    scalars = tuple(a.name for a in back.args if not a.is_tensor and a.name not in flags)
    index = {name: i for i, name in enumerate(op.arg_names)}
    no_grad_inputs = tuple(a.name for a in op.args if a.is_tensor and a.name not in back.grads)

    def setup_context(ctx, inputs, output):
        bound = dict(zip(op.arg_names, inputs))
        values = dict(bound, **dict(zip(op.return_names, output)))
        ctx.mark_non_differentiable(*(values[n] for n in op.non_differentiable))
        ctx.save_for_backward(*(values[n] for n in saved))
        ctx.scalars = {n: op.param(bound, n, AttentionParams._field_defaults.get(n)) for n in scalars}
        ctx.flags = {flag: _needs_grad(ctx, index[input_name]) if input_name in index else False
                     for flag, input_name in flags.items()}
        ctx.no_grad = [n for n in no_grad_inputs if n in index and _needs_grad(ctx, index[n])]

    def backward(ctx, grad_out, *_other_grads):
        if ctx.no_grad:
            raise NotImplementedError(f"attnlower: the gradient with respect to {', '.join(ctx.no_grad)} is not "
                                      f"implemented; pass {ctx.no_grad[0]}.detach() (ALiBi slopes are constants "
                                      f"in ALiBi models)")
        values = dict(zip(saved, ctx.saved_tensors), grad_out=grad_out, **ctx.scalars, **ctx.flags)
        results = call_backward(*(values[n] for n in back.arg_names))
        by_input = dict(zip(back.grads, results))
        for flag, input_name in flags.items():
            if not ctx.flags[flag]:
                by_input[input_name] = None
        return tuple(by_input.get(name) for name in op.arg_names)

    return setup_context, backward


def _register_autograd(op: registry.OpDef, op_def) -> None:
    setup_context, backward = _autograd(op, getattr(torch.ops.attnlower, op.backward))
    op_def.register_autograd(backward, setup_context=setup_context)


def _eager_function(op: registry.OpDef) -> type:
    """The same autograd glue as a torch.autograd.Function calling the implementations directly: what
    `attnlower.ops` uses for a plain eager call that needs a gradient (no tracing, no mode, no subclass), so
    that call pays neither custom_op's Python layers nor the dispatcher, forward or backward."""
    setup_context, backward = _autograd(op, _IMPLS[op.backward])
    impl = _IMPLS[op.name]

    def forward(ctx, *args):
        # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips binding the arguments
        # through inspect.signature on every call
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    return type(f"{op.name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
        "__doc__": f"Eager autograd of attnlower::{op.name} (see lowering/ops.py, _eager_function).",
    })


for _name in ("flash_attention", "sliding_window_attention"):
    _register_autograd(registry.OPS[_name], _DENSE_OPS[_name])

EAGER_AUTOGRAD = {name: _eager_function(registry.OPS[name]) for name in ("flash_attention", "sliding_window_attention")}
