"""Integrations with other libraries, loaded only when those libraries are.

`import attnlower` calls `register_with_transformers_when_loaded()`: if transformers is already
imported, attnlower's attention is registered now; otherwise a one-shot import hook registers it
right after `transformers.modeling_utils` is imported, so that
`from_pretrained(..., attn_implementation="attnlower")` works without importing transformers (or
triton, or the attnlower ops) at `import attnlower`. The explicit, equivalent call is
`attnlower.integrations.hf.register()`.
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings

_HOOKED_MODULE = "transformers.modeling_utils"


def _register_now() -> None:
    try:
        from .hf import register

        register()
    except Exception as e:  # noqa: BLE001 - never break the user's `import transformers`
        warnings.warn(f"attnlower: could not register attn_implementation='attnlower' with transformers "
                      f"({type(e).__name__}: {e}); call attnlower.integrations.hf.register() to see the error",
                      stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers.modeling_utils` is about to load, wraps its loader so
    that attnlower registers right after the module has run, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module):
            exec_module(module)
            _register_now()

        loader.exec_module = exec_then_register
        return spec


def register_with_transformers_when_loaded() -> None:
    """Register with transformers now if it is loaded, else as soon as it is (see the module docstring)."""
    if _HOOKED_MODULE in sys.modules:
        _register_now()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
