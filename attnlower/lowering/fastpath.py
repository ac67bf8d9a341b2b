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

ATTNLOWER_FAST_LAUNCH=0 turns this off (every call through the launchers).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable

import torch
from torch import Tensor

ENABLED = os.environ.get("ATTNLOWER_FAST_LAUNCH", "1") != "0"
DEVICE_TYPE = "cuda"          # tests point it at "cpu" with a stub kernel (tests/lowering/test_fastpath.py)
CACHE_SIZE = 1024             # entries; bounded like the plan caches (plan.PLAN_CACHE_SIZE)

_recording = threading.local()


@contextlib.contextmanager
def recording(into: list):
    """Within: every kernel launched through `launch()` is appended to `into` as a LaunchRecord."""
    before = getattr(_recording, "into", None)
    _recording.into = into
    try:
        yield into
    finally:
        _recording.into = before


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


def hooks_active() -> bool:
    """Triton's launch hooks (profilers) see only launches through JITFunction.run."""
    try:
        from triton import knobs
    except ImportError:
        return True
    return knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None


# ------------------------------------------------------------------------------ the cached launch


def _empty_strided() -> Callable:
    try:
        from torch._C._dynamo.guards import _empty_strided_cuda  # Inductor's allocator: ~0.5 us, not ~6
    except ImportError:
        _empty_strided_cuda = None

    def alloc(size, stride, dtype, device):
        if _empty_strided_cuda is not None and device.type == "cuda" and \
                not torch.utils.deterministic.fill_uninitialized_memory:
            return _empty_strided_cuda(size, stride, dtype)  # the current device: the caller checked it is q's
        return torch.empty_strided(size, stride, dtype=dtype, device=device)

    return alloc


alloc = _empty_strided()


def current_device_index() -> int:
    return torch.cuda.current_device() if DEVICE_TYPE == "cuda" else -1


def raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index) if DEVICE_TYPE == "cuda" else 0


class CachedKernel:
    """One recorded launch: the compiled kernel, its grid, and its bound arguments with the tensor slots
    marked by which of the call's tensors fills them (by position in the call's tensor tuple)."""

    __slots__ = ("compiled", "grid", "slots", "template")

    def __init__(self, compiled, grid, slots, template):
        self.compiled, self.grid, self.slots, self.template = compiled, grid, slots, template

    @classmethod
    def build(cls, record, tensors: tuple) -> "CachedKernel | None":
        """From a launch record and the call's tensors; None when a tensor argument is not one of them."""
        fn, grid, args, kwargs, compiled = record
        if compiled is None or not hasattr(compiled, "run") or not hasattr(compiled, "function"):
            return None
        names = list(fn.arg_names)
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
        if set(bound) != set(names):
            return None
        values = [bound[n] for n in names]
        slots = []
        for position, value in enumerate(values):
            if isinstance(value, Tensor):
                source = next((i for i, t in enumerate(tensors) if t is value), None)
                if source is None:
                    return None
                slots.append((position, source))
                values[position] = None
        grid = tuple(grid) + (1,) * (3 - len(grid))
        return cls(compiled, grid, tuple(slots), values)

    def launch(self, pointers: list, stream: int) -> None:
        args = list(self.template)
        for position, source in self.slots:
            args[position] = pointers[source]
        c = self.compiled
        c.run(self.grid[0], self.grid[1], self.grid[2], stream, c.function, c.packed_metadata, None, None, None, *args)


class DenseForwardEntry:
    """What a repeat dense forward call needs: the outputs' layouts and the cached launch(es)."""

    __slots__ = ("out_size", "out_stride", "lse_size", "lse_stride", "dtype", "kernels", "dropout")

    def __init__(self, out, lse, kernels, dropout):
        self.out_size, self.out_stride = tuple(out.shape), out.stride()
        self.lse_size, self.lse_stride = tuple(lse.shape), lse.stride()
        self.dtype, self.kernels, self.dropout = out.dtype, kernels, dropout

    def __call__(self, q, k, v, bias, alibi, pointers: list, draw_rng: Callable):
        device = q.device
        out = alloc(self.out_size, self.out_stride, self.dtype, device)
        lse = alloc(self.lse_size, self.lse_stride, torch.float32, device)
        rng = draw_rng(q, self.dropout)
        pointers.append(out.data_ptr())
        pointers.append(lse.data_ptr())
        pointers.append(rng.data_ptr())
        stream = raw_stream(device.index)
        for kernel in self.kernels:
            kernel.launch(pointers, stream)
        return out, lse, rng


_DENSE: dict[tuple, Any] = {}


def dense_key(op, q, k, v, bias, alibi, scalars: tuple) -> tuple | None:
    """The cache key of a dense forward call, or None when the call cannot take this path. The last
    element holds the input pointers (not part of the key proper: see `dense_forward`)."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    device = q.device
    if device.type != DEVICE_TYPE or device.index != current_device_index():
        return None
    qp, kp, vp = q.data_ptr(), k.data_ptr(), v.data_ptr()
    key = [op, scalars, q.shape, q.stride(), q.dtype, k.shape, k.stride(), k.dtype, k.device,
           v.shape, v.stride(), v.dtype, v.device, qp & 15, kp & 15, vp & 15]
    pointers = [qp, kp, vp, 0, 0]
    for i, t in ((3, bias), (4, alibi)):
        if t is None:
            key.append(None)
            continue
        if type(t) is not Tensor:
            return None
        p = t.data_ptr()
        pointers[i] = p
        key.append((t.shape, t.stride(), t.dtype, t.device, p & 15))
    if q.dtype is torch.float32:
        key.append(torch.backends.cuda.matmul.allow_tf32 if DEVICE_TYPE == "cuda" else False)
    return tuple(key), pointers


def lookup_dense(key: tuple):
    return _DENSE.get(key)


def remember_dense(key: tuple, records: list, q, k, v, bias, alibi, out, lse, rng, dropout_p) -> None:
    """Cache the launches a first call made, when each of their tensors is one of the call's."""
    if not ENABLED or not pointer_rule_holds() or len(_DENSE) >= CACHE_SIZE:
        return
    tensors = (q, k, v, bias, alibi, out, lse, rng)
    kernels = []
    for record in records:
        kernel = CachedKernel.build(record, tensors)
        if kernel is None:
            return
        kernels.append(kernel)
    _DENSE[key] = DenseForwardEntry(out, lse, tuple(kernels), dropout_p)


def clear() -> None:
    _DENSE.clear()


def usable() -> bool:
    """Per call: the path is on, Triton's rules are known, and no launch hook wants to see launches."""
    return ENABLED and pointer_rule_holds() and not hooks_active()
