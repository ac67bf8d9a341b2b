"""Reading attnlower's on/off environment switches (ATTNLOWER_GLUON, ATTNLOWER_INDUCTOR_KERNELS), each once at
import."""
from __future__ import annotations

import os


def switch_from_env(name: str, *, on: str, off: str) -> bool:
    """The switch `name`: "1" (unset: the default) is True, "0" False; any other value raises, saying what each
    means (`on`, `off`)."""
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{name}: expected 1 ({on}, the default) or 0 ({off}), got {value!r}")
    return value == "1"
