"""attnlower: a torch.compile backend that finds attention however it is spelled and lowers it
to one fused op (flash, sliding-window or paged) with generated Triton kernels.

    model = torch.compile(model, backend="attnlower")
    reports = attnlower.inspect(model, *inputs)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .report.records import CompileReport, Reports, Site  # noqa: E402


def inspect(fn, *args, options=None, dynamic=None, **kwargs):
    """Compile `fn` (a function or module) with the attnlower backend, run it once on the given
    arguments, and return the CompileReports of the graphs it made (what was found, chosen, refused).
    `print()` of the result prints each graph's site table.

    The rest of the process's compiled state is left alone: no `torch._dynamo.reset()`, so functions
    the caller compiled earlier (with any backend) keep their compiled code. `fn` is compiled afresh
    each call (a new backend object, which Dynamo does not match to earlier compiles). `dynamic=None`
    compiles as a first compile would (static shapes), whatever shapes earlier compiles of `fn` saw."""
    import functools

    import torch

    from .compiler import backend
    from .compiler.options import Options
    from .report.records import reports

    Options.from_mapping(options)   # a bad option fails here, before anything runs
    start = len(reports())
    fresh = functools.partial(backend.attnlower_backend, options=options)
    with _room_for_one_more_compile():
        compiled = torch.compile(fn, backend=fresh, dynamic=False if dynamic is None else dynamic)
        compiled(*args, **kwargs)
    return Reports(reports()[start:])


def _room_for_one_more_compile():
    """Each inspect() adds a compile of `fn`'s code next to the caller's own: lift Dynamo's per-code
    recompile limit for this call so an inspect() after many others still compiles (and reports)."""
    import torch

    config = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(config, n)]
    return config.patch({n: max(getattr(config, n), 1 << 16) for n in names})


def __getattr__(name):
    # Lazy: importing attnlower (e.g. through the entry point) must not register ops or import triton.
    # import_module, not `from . import ops`: that spelling looks the attribute up on this package
    # first, which calls this __getattr__ again (infinite recursion).
    if name == "ops":
        import importlib

        return importlib.import_module(f"{__name__}.ops")
    if name == "check_options":
        from .compiler.options import check_options

        return check_options
    if name in ("check_errors", "set_paged_checks", "PagedInputError"):
        from .lowering import errors

        return getattr(errors, name)
    if name == "PagedKVCache":
        from .cache import PagedKVCache

        return PagedKVCache
    raise AttributeError(f"module 'attnlower' has no attribute {name!r}")


# `from_pretrained(..., attn_implementation="attnlower")`: registered once transformers is imported
# (an import hook; imports neither transformers nor triton now). See attnlower/integrations/.
from .integrations import register_with_transformers_when_loaded as _register_with_transformers  # noqa: E402

_register_with_transformers()
