"""Cached launches: a repeat call with the same signature launches the compiled kernel directly.

Measured on an H200 (torch 2.11, triton 3.6, 2026-12-03, /work/gpu-logs/call1/host_probe.log): Triton's
`JITFunction.run` costs 48 us per launch of `_flash_fwd_kernel` (binding 51 arguments, specializing 39 of
them, building the cache key), `CompiledKernel.run` with the bound arguments 11 us. So the first call of a
signature goes through the launchers (`launch.py`: validation, plan, Triton's JIT, which compiles or finds
the kernel); it is recorded, and every later call with the same key allocates the outputs and calls
`CompiledKernel.run` with the arguments in the order Triton binds them.

The key holds everything the launch is derived from: the op's scalars, each tensor's shape, strides, dtype
and device, and what Triton specializes a pointer on: whether its address is a multiple of 16 (checked
against the installed Triton's own `native_specialize_impl` at first use; any other rule, or a Triton
without it, turns this path off). Every integer argument (sizes, strides, offsets) is a function of the
key, so the specialization Triton would pick for them is fixed per key; pointers are the only arguments
that vary per call. Anything the key cannot hold (tensor subclasses, another device than the current one,
launch hooks such as a profiler's, tracing) takes the launchers' path.

On by default; ATTNLOWER_FAST_LAUNCH=0 turns it off. On the H200 (torch 2.11, triton 3.6, 2026-12-03) the cached
launch matched Triton's JIT launch bit for bit in 12 cases (bf16 / fp16 / fp32, BHSD and BSHD views, a float bias,
GQA, a q 4 or 8 bytes off a 16-byte boundary), each in its own process with CUDA_LAUNCH_BLOCKING=1
(/work/gpu-logs/call4/fastpath.log). The "misaligned address" an earlier probe blamed on this path came from its
reference: fp32 `F.scaled_dot_product_attention` on a q 8 bytes off a 16-byte boundary faults on that GPU
(torch 2.11's efficient-attention backend); the kernels here ran that case correctly.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

import torch
from torch import Tensor

ENABLED = os.environ.get("ATTNLOWER_FAST_LAUNCH", "1") != "0"
DEVICE_TYPE = "cuda"          # tests point it at "cpu" with a stub kernel (tests/lowering/test_fastpath.py)
CACHE_SIZE = 1024             # entries; bounded like the plan caches (plan.PLAN_CACHE_SIZE)
# Launch keywords that are options of the compiled kernel (its launcher holds them), not kernel arguments
LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "launch_pdl"})

_recording = threading.local()


@contextlib.contextmanager
def recording(into: list):
    """Within: every kernel launched through `launch()` is appended to `into` as (fn, grid, args, kwargs, what
    Triton returned), every `scratch()` buffer as ("scratch", tensor), every `persistent()` one as
    ("persistent", tensor)."""
    before = getattr(_recording, "into", None)
    _recording.into = into
    try:
        yield into
    finally:
        _recording.into = before


def scratch(t: Tensor) -> Tensor:
    """Declare `t` a launcher's own uninitialized buffer (a workspace the kernels fully write before reading):
    a cached call may allocate it afresh. Any other tensor a launch reads must be one of the call's inputs or
    outputs, or declared `persistent`, or the call is not cached (a copy made by the launcher, a zero-filled
    buffer, ...)."""
    into = getattr(_recording, "into", None)
    if into is not None:
        into.append(("scratch", t))
    return t


def persistent(t: Tensor) -> Tensor:
    """Declare `t` a buffer the launcher keeps for the life of the process, at one address (the paged split
    counters, launch_paged.split_counters): a cached call passes that same address. Only for tensors that are
    never freed or replaced, whose contents every launch leaves as the next one expects."""
    into = getattr(_recording, "into", None)
    if into is not None:
        into.append(("persistent", t))
    return t


def uncacheable(reason: str) -> None:
    """Declare that this call made a launch the cached path cannot replay (the Gluon forward: its TMA descriptors
    hold the tensors' addresses and CompiledKernel.run would get the first call's): `remember` then caches
    nothing, and every call of the signature goes through the launchers."""
    into = getattr(_recording, "into", None)
    if into is not None:
        into.append(("uncacheable", reason))


def launch(fn, grid: tuple, args: tuple, kwargs: dict):
    """`fn[grid](*args, **kwargs)`, recorded when a `recording()` is active. Returns Triton's result."""
    compiled = fn[grid](*args, **kwargs)
    into = getattr(_recording, "into", None)
    if into is not None:
        into.append((fn, grid, args, kwargs, compiled))
    return compiled


# ------------------------------------------------------------------------------ Triton's rules

_RULE_OK: bool | None = None


def pointer_rule_holds() -> bool:
    """Whether the installed Triton specializes a pointer on exactly `address % 16 == 0` (and launches
    a CompiledKernel the way this module calls it). Checked once against Triton itself."""
    global _RULE_OK
    if _RULE_OK is None:
        _RULE_OK = _check_pointer_rule()
    return _RULE_OK


def _check_pointer_rule() -> bool:
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
        from triton.compiler.compiler import CompiledKernel
    except ImportError:
        return False

    class _Pointer:
        dtype = torch.float16

        def __init__(self, address):
            self.address = address

        def data_ptr(self):
            return self.address

    try:
        for address in (0, 4, 8, 12, 16, 32, 48, 64, 256, 4096 + 8):
            spec = native_specialize_impl(BaseBackend, _Pointer(address), False, True, True)
            if spec != ("*fp16", "D" if address % 16 == 0 else ""):
                return False
    except Exception:  # noqa: BLE001 - a Triton whose rules this module does not know: the JIT path, always
        return False
    return all(hasattr(CompiledKernel, name) for name in ("run", "launch_metadata"))


_KNOBS = None


def hooks_active() -> bool:
    """Triton's launch hooks (profilers) see only launches through JITFunction.run. Triton 3.6 - 3.9 keep them in
    HookChains (empty unless a tool added a hook); older ones as None or a callable."""
    global _KNOBS
    if _KNOBS is None:
        try:
            from triton import knobs
        except ImportError:
            return True
        _KNOBS = knobs.runtime
    enter, leave = _KNOBS.launch_enter_hook, _KNOBS.launch_exit_hook
    return (enter is not None and (getattr(enter, "calls", True) or False)) or \
        (leave is not None and (getattr(leave, "calls", True) or False))


# ------------------------------------------------------------------------------ the cached launch


def _empty_strided() -> Callable:
    try:
        # Inductor's allocator (its generated code's empty_strided_cuda): torch.empty cost 6.6 us per call on the
        # H200 host (/work/gpu-logs/call1: 13.3 us for two); this one's cost is unmeasured alone (the GPU probe
        # times the whole call)
        from torch._C._dynamo.guards import _empty_strided_cuda
    except ImportError:
        _empty_strided_cuda = None

    def alloc(size, stride, dtype, device):
        """An uninitialized tensor on `device` (the current CUDA device for CUDA). Plain tensors only: Inductor's
        allocator goes around the dispatcher, so it must never run while a mode traces."""
        # torch.empty fills with NaN under deterministic mode + fill_uninitialized_memory (tests poison outputs so)
        if _empty_strided_cuda is not None and device.type == "cuda" and not (
                torch._C._get_deterministic_algorithms() and torch.utils.deterministic.fill_uninitialized_memory):
            return _empty_strided_cuda(size, stride, dtype)  # the current device: the caller checked it is q's
        return torch.empty_strided(size, stride, dtype=dtype, device=device)

    return alloc


alloc = _empty_strided()


def current_device_index() -> int | None:
    return torch.cuda.current_device() if DEVICE_TYPE == "cuda" else None


def raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index) if DEVICE_TYPE == "cuda" else 0


class CachedKernel:
    """One recorded launch: the compiled kernel, its grid, and its bound arguments with the tensor slots
    marked by which per-call pointer fills them (an index into the call's pointer list)."""

    __slots__ = ("compiled", "grid", "slots", "template")

    def __init__(self, compiled, grid, slots, template):
        self.compiled, self.grid, self.slots, self.template = compiled, grid, slots, template

    def launch(self, pointers: list, stream: int) -> None:
        args = list(self.template)
        for position, source in self.slots:
            args[position] = pointers[source]
        c = self.compiled
        c.run(self.grid[0], self.grid[1], self.grid[2], stream, c.function, c.packed_metadata, None, None, None, *args)


class CachedCall:
    """Every launch of one call signature. Per call: the caller's input pointers, then fresh allocations of
    what the launchers allocated (outputs, workspaces) in the order the launches first used them, then the
    launches. Persistent tensors (the paged error flags, the paged split counters: `persistent`) are baked in by
    address."""

    __slots__ = ("kernels", "allocs", "returns", "extra")

    def __init__(self, kernels, allocs, returns, extra=None):
        self.kernels, self.allocs, self.returns, self.extra = kernels, allocs, returns, extra

    @classmethod
    def build(cls, records: list, inputs: tuple, returned: tuple, persistent: tuple = (), extra=None):
        """From the launch records of a first call; None when a launch cannot be replayed this way."""
        allocated: list[Tensor] = []
        kernels = []
        fresh = [t for t in returned] + [record[1] for record in records if record[0] == "scratch"]
        persistent = tuple(persistent) + tuple(record[1] for record in records if record[0] == "persistent")
        if any(record[0] == "uncacheable" for record in records):
            return None
        for record in records:
            if record[0] in ("scratch", "persistent"):
                continue
            fn, grid, args, kwargs, compiled = record
            if compiled is None or not hasattr(compiled, "run") or not hasattr(compiled, "function"):
                return None
            names = list(fn.arg_names)
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
            if set(bound) != set(names):
                return None
            values = [bound[n] for n in names]
            slots = []
            for position, value in enumerate(values):
                if not isinstance(value, Tensor):
                    continue
                if any(value is t for t in persistent):
                    values[position] = value.data_ptr()
                    continue
                source = next((i for i, t in enumerate(inputs) if t is value), None)
                if source is None:
                    source = next((i for i, t in enumerate(allocated) if t is value), None)
                    if source is None:
                        if not any(value is t for t in fresh):
                            return None   # neither an input, an output nor a declared scratch buffer
                        allocated.append(value)
                        source = len(allocated) - 1
                    source += len(inputs)
                slots.append((position, source))
                values[position] = None
            kernels.append(CachedKernel(compiled, tuple(grid) + (1,) * (3 - len(grid)), tuple(slots), values))
        if not kernels:
            return None
        returns = []
        for t in returned:
            index = next((i for i, a in enumerate(allocated) if a is t), None)
            if index is None:
                return None
            returns.append(index)
        allocs = tuple((tuple(t.shape), t.stride(), t.dtype) for t in allocated)
        return cls(tuple(kernels), allocs, tuple(returns), extra)

    def __call__(self, pointers: list, device: torch.device) -> list:
        allocated = [alloc(size, stride, dtype, device) for size, stride, dtype in self.allocs]
        for t in allocated:
            pointers.append(t.data_ptr())
        stream = raw_stream(device.index)
        for kernel in self.kernels:
            kernel.launch(pointers, stream)
        return [allocated[i] for i in self.returns]


_CALLS: dict[tuple, CachedCall] = {}


def call_key(op: str, scalars: tuple, tensors: tuple):
    """(key, input pointers) of a call on `tensors` (first one: q), or None when it cannot take this path.

    Per tensor the key holds what specializes a launch on it: shape, strides, dtype, device and whether its address
    is a multiple of 16 (None for an absent optional tensor, whose pointer is 0). FakeTensor / FunctionalTensor
    (tracing, the traced decomposition) and other subclasses are not Tensor; tensors off the current device would
    launch under another context. One loop, no call per tensor: this runs on every launch (issue 18 item 4)."""
    q = tensors[0]
    if type(q) is not Tensor:
        return None
    device = q.device
    if device.type != DEVICE_TYPE or device.index != current_device_index():
        return None
    key = [op, scalars]
    pointers: list = []
    for t in tensors:
        if t is None:
            key.append(None)
            pointers.append(0)
            continue
        if type(t) is not Tensor:
            return None
        p = t.data_ptr()
        pointers.append(p)
        key.append((t.shape, t.stride(), t.dtype, t.device, p & 15))
    if q.dtype is torch.float32:  # fp32 dots: TF32 or not is part of the plan
        key.append(torch.backends.cuda.matmul.allow_tf32 if DEVICE_TYPE == "cuda" else False)
    return tuple(key), pointers


def lookup(key: tuple):
    return _CALLS.get(key)


def remember(key: tuple, records: list, inputs: tuple, returned: tuple, persistent: tuple = (), extra=None) -> None:
    """Cache the launches a first call made (when every tensor they read is accounted for)."""
    if not ENABLED or not records or not pointer_rule_holds():
        return
    call = CachedCall.build(records, inputs, returned, persistent, extra)
    if call is not None:
        if len(_CALLS) >= CACHE_SIZE:   # bounded: the oldest signature goes (a process seeing many shapes)
            del _CALLS[next(iter(_CALLS))]
        _CALLS[key] = call


def clear() -> None:
    _CALLS.clear()


def usable() -> bool:
    """Per call: the path is on, Triton's rules are known, and no launch hook wants to see launches."""
    return ENABLED and pointer_rule_holds() and not hooks_active()
