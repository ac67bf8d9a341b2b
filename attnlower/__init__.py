"""attnlower: a torch.compile backend that finds attention however it is spelled and lowers it
to one fused op (flash, sliding-window or paged) with generated Triton kernels.

    model = torch.compile(model, backend="attnlower")
    reports = attnlower.inspect(model, *inputs)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .compiler.report import CompileReport, Reports, Site  # noqa: E402


def inspect(fn, *args, options=None, dynamic=None, **kwargs):
    """Compile `fn` (a function or module) with the attnlower backend, run it once on the given
    arguments, and return the CompileReports of the graphs it made (what was found, chosen, refused).
    `print()` of the result prints each graph's site table."""
    import torch

    from .compiler import backend

    start = len(backend._REPORTS)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="attnlower", options=options, dynamic=dynamic)
    compiled(*args, **kwargs)
    return Reports(backend._REPORTS[start:])


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
