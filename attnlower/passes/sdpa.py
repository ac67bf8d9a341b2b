"""The SDPA op family's arguments: where each one sits in each op's schema, and reading them.

Pre-dispatch graphs hold `aten.scaled_dot_product_attention`; graphs from other tools may hold one of
its device-specific forms, whose schemas put the mask, dropout, causal flag and scale elsewhere (or
leave them out). `ARGUMENTS` is that table; `sdpa_arguments` reads any of them the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

# op -> argument -> (position, keyword): a keyword given wins, else the position, else the default.
# A position of None: the op takes it by keyword only; an argument missing: the op has no such input.
ARGUMENTS: dict = {
    aten.scaled_dot_product_attention.default: {
        "mask": (3, "attn_mask"), "dropout_p": (4, "dropout_p"), "is_causal": (5, "is_causal"),
        "scale": (6, "scale"), "enable_gqa": (7, "enable_gqa")},
    aten._scaled_dot_product_flash_attention_for_cpu.default: {
        "mask": (None, "attn_mask"), "dropout_p": (3, "dropout_p"), "is_causal": (4, "is_causal"),
        "scale": (None, "scale")},
    aten._scaled_dot_product_flash_attention.default: {
        "dropout_p": (3, "dropout_p"), "is_causal": (4, "is_causal"), "scale": (6, "scale")},
    aten._scaled_dot_product_efficient_attention.default: {
        "mask": (3, "attn_bias"), "dropout_p": (5, "dropout_p"), "is_causal": (6, "is_causal"),
        "scale": (7, "scale")},
    aten._scaled_dot_product_cudnn_attention.default: {
        "mask": (3, "attn_bias"), "dropout_p": (5, "dropout_p"), "is_causal": (6, "is_causal"),
        "scale": (8, "scale")},
}
DEFAULTS = {"mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass(frozen=True)
class SdpaArguments:
    """An SDPA call's arguments, whichever op of the family it is."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: object
    dropout_p: object
    is_causal: object
    scale: object
    enable_gqa: object


def sdpa_arguments(node: fx.Node) -> SdpaArguments:
    """The arguments of a call of an op in `ARGUMENTS`."""
    where = ARGUMENTS.get(node.target)
    if where is None:
        raise ValueError(f"expected a call of one of the SDPA ops {sorted(map(str, ARGUMENTS))}, got {node.target}; "
                         "add the op's argument positions to sdpa.ARGUMENTS")
    args, kwargs = node.args, node.kwargs

    def read(name: str):
        position, keyword = where.get(name, (None, None))
        if keyword in kwargs:
            return kwargs[keyword]
        if position is not None and len(args) > position:
            return args[position]
        return DEFAULTS[name]

    return SdpaArguments(args[0], args[1], args[2], read("mask"), read("dropout_p"), read("is_causal"),
                         read("scale"), read("enable_gqa"))


def argument_position(op, name: str) -> tuple[int | None, str | None]:
    """(position, keyword) of argument `name` in `op`'s schema; (None, None) when it has none."""
    return ARGUMENTS.get(op, {}).get(name, (None, None))
