"""One definition per op: the registry every other piece of the op boundary is derived from.

Each `OpDef` holds an op's arguments (name, schema type, default), its returns, the AttentionParams
fields it fixes, its launcher and reference per direction, the Triton kernels it launches per
direction, and its backward op. From it come:

  - the schema strings (`OpDef.schema`) the ops are registered with (`lowering/ops.py`);
  - the autograd glue (`lowering/ops.py`, `_register_autograd`): which inputs and outputs are saved, the
    backward op's call (its arguments are looked up by name among the saved tensors and the forward's
    arguments), and which gradients go to which input;
  - the op and kernel names the report and the dump print (`OPS[name].kernels[direction]`);
  - the launch plan the dump shows (`lowering/plan.py`, `kernel_plan`).

Adding an argument to an op (a sink tensor, a value head dim) is one `Arg` here, plus what the
implementation does with it (the launcher / reference keyword, or an AttentionParams field).

This module imports neither triton nor the kernels: the pass side and the dump read it anywhere.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

REQUIRED = object()   # an Arg without a default


class Arg(NamedTuple):
    """One schema argument: `type name[=default]` (types are torch.library schema types)."""

    name: str
    type: str
    default: Any = REQUIRED

    @property
    def is_tensor(self) -> bool:
        return self.type.startswith("Tensor")

    def schema(self) -> str:
        if self.default is REQUIRED:
            return f"{self.type} {self.name}"
        # by identity: a dict lookup would spell an int default 0 as False (0 == False)
        value = next((text for const, text in ((None, "None"), (True, "True"), (False, "False"))
                      if self.default is const), self.default) if not isinstance(self.default, float) \
            else repr(self.default)
        return f"{self.type} {self.name}={value}"

    def required(self) -> "Arg":
        return self._replace(default=REQUIRED)


class KernelSet(NamedTuple):
    """The @triton.jit entry points one direction of an op launches, in launch order."""

    module: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class OpDef:
    """One op of namespace `attnlower` (docs/INTERFACES.md section 1)."""

    name: str
    args: tuple[Arg, ...]
    returns: tuple[tuple[str, str], ...]            # (name, schema type)
    family: str                                     # "dense", "dense_backward", "paged"
    doc: str
    fixed: tuple[tuple[str, Any], ...] = ()         # AttentionParams fields the op fixes (sliding: causal)
    kernels: dict[str, KernelSet] = field(default_factory=dict)   # direction ("forward", "backward") -> kernels
    launchers: dict[str, tuple[str, str]] = field(default_factory=dict)    # direction -> (module, function)
    references: dict[str, tuple[str, str]] = field(default_factory=dict)   # direction -> (module, function)
    backward: str | None = None                     # the op computing its gradients
    grads: tuple[str, ...] = ()                     # the backward op's returns, in order, name the inputs they are the gradient of
    non_differentiable: tuple[str, ...] = ()        # returns that carry no gradient
    opaque: bool = False                            # stays one custom op when traced (paged: its error flags)

    @property
    def qualname(self) -> str:
        return f"attnlower::{self.name}"

    @functools.cached_property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @functools.cached_property
    def return_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.returns)

    @property
    def schema(self) -> str:
        """The schema (without the op name) the op is registered with."""
        args = ", ".join(a.schema() for a in self.args)
        if len(self.returns) == 1:
            return f"({args}) -> {self.returns[0][1]} {self.returns[0][0]}"
        return f"({args}) -> ({', '.join(f'{t} {n}' for n, t in self.returns)})"

    def signature(self):
        """The Python signature of the op's implementation (torch.library.triton_op infers the schema from it)."""
        import inspect
        from typing import Optional

        import torch

        py = {"Tensor": torch.Tensor, "Tensor?": Optional[torch.Tensor], "float?": Optional[float], "float": float,
              "bool": bool, "bool?": Optional[bool], "int": int}
        params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=py[a.type],
                                    default=inspect.Parameter.empty if a.default is REQUIRED else a.default)
                  for a in self.args]
        returns = torch.Tensor if len(self.returns) == 1 else tuple[tuple(py[t] for _, t in self.returns)]
        return inspect.Signature(params, return_annotation=returns)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """{argument name: value}, defaults filled: how the implementation reads its call."""
        if len(args) == len(self.args) and not kwargs:
            return dict(zip(self.arg_names, args))
        if len(args) > len(self.args):
            raise TypeError(f"{self.qualname}: expected at most {len(self.args)} arguments {self.schema}, got "
                            f"{len(args)}")
        bound = dict(zip(self.arg_names, args))
        for a in self.args[len(args):]:
            if a.name in kwargs:
                bound[a.name] = kwargs[a.name]
            elif a.default is REQUIRED:
                raise TypeError(f"{self.qualname}: missing the argument {a.name!r} of {self.schema}")
            else:
                bound[a.name] = a.default
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.qualname}: unexpected argument(s) {sorted(unknown)}; its schema is {self.schema}")
        return bound

    def param(self, bound: dict, name: str, default: Any = None) -> Any:
        """The value of AttentionParams field `name` for this call: its argument, or what the op fixes."""
        if name in bound:
            return bound[name]
        return dict(self.fixed).get(name, default)


# ----------------------------------------------------------------------------------- the arguments

Q, K, V = Arg("q", "Tensor"), Arg("k", "Tensor"), Arg("v", "Tensor")
BIAS = Arg("bias", "Tensor?", None)
ALIBI_SLOPES = Arg("alibi_slopes", "Tensor?", None)
SCALE = Arg("scale", "float?", None)
CAUSAL = Arg("causal", "bool", False)
BOTTOM_RIGHT = Arg("bottom_right", "bool", False)
WINDOW = Arg("window", "int")
SOFTCAP = Arg("softcap", "float", 0.0)
DROPOUT_P = Arg("dropout_p", "float", 0.0)
EMPTY_ROWS_NAN = Arg("empty_rows_nan", "bool", False)
# paged: None (the default) keeps 0 < seq_len < Tq an error (PagedInputError); False / True opt in to chunks longer than
# a sequence, whose rows before its first token (and every row of an empty sequence) see no key and give 0 / NaN
# as the dense ops' empty_rows_nan (issue 22 class 5).
PAGED_EMPTY_ROWS_NAN = Arg("empty_rows_nan", "bool?", None)
# Masked scores take this value instead of -inf (None: masking); AttentionParams.mask_fill (issue 22, class 2).
FILL = Arg("fill", "float?", None)
# One logit per query head [Hq] in the softmax denominator, adding no value (issue 21.2); a launcher keyword.
SINKS = Arg("sinks", "Tensor?", None)
# Document ids [B|1, Tk] (packed sequences, issue 21.3): key j visible only within query i's document; a launcher
# keyword.
DOC_IDS = Arg("doc_ids", "Tensor?", None)
# A one-element bool device tensor (issue 22 class 1): True -> the proven structure (causal / window / alibi, the bias
# unread), False -> the bias over every block (the structure ignored); read by the kernels, never by the host.
VERIFIED = Arg("verified", "Tensor?", None)

DENSE_RETURNS = (("out", "Tensor"), ("lse", "Tensor"), ("rng_state", "Tensor"))
# The scalar semantics every dense call carries into its backward, in the backward schema's order.
DENSE_PARAMS = (SCALE, CAUSAL, BOTTOM_RIGHT, SOFTCAP, DROPOUT_P, WINDOW, EMPTY_ROWS_NAN)

_DENSE_KERNELS = {
    "forward": KernelSet("attnlower.lowering.kernels.flash_fwd", ("_flash_fwd_kernel",)),
    "backward": KernelSet("attnlower.lowering.kernels.flash_bwd",
                          ("_flash_bwd_preprocess_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel")),
}
_DENSE_LAUNCHERS = {"forward": ("attnlower.lowering.launch", "flash_forward"),
                    "backward": ("attnlower.lowering.launch", "flash_backward")}
_DENSE_REFERENCES = {"forward": ("attnlower.lowering.reference", "reference_flash_forward"),
                     "backward": ("attnlower.lowering.reference", "reference_flash_backward")}

FLASH = OpDef(
    "flash_attention",
    args=(Q, K, V, BIAS, ALIBI_SLOPES, SCALE, CAUSAL, BOTTOM_RIGHT, SOFTCAP, DROPOUT_P, EMPTY_ROWS_NAN, SINKS, DOC_IDS,
          FILL, VERIFIED),
    returns=DENSE_RETURNS, family="dense", doc="dense attention, prefill or training",
    kernels=_DENSE_KERNELS, launchers=_DENSE_LAUNCHERS, references=_DENSE_REFERENCES,
    backward="flash_attention_backward", non_differentiable=("lse", "rng_state"),
)
SLIDING = OpDef(
    "sliding_window_attention",
    args=(Q, K, V, WINDOW, BIAS, ALIBI_SLOPES, SCALE, BOTTOM_RIGHT, SOFTCAP, DROPOUT_P, EMPTY_ROWS_NAN, SINKS,
          DOC_IDS, FILL, VERIFIED),
    returns=DENSE_RETURNS, family="dense", doc="causal attention over the `window` most recent keys",
    fixed=(("causal", True),),
    kernels=_DENSE_KERNELS, launchers=_DENSE_LAUNCHERS, references=_DENSE_REFERENCES,
    backward="flash_attention_backward", non_differentiable=("lse", "rng_state"),
)
DENSE_BACKWARD = OpDef(
    "flash_attention_backward",
    # grad_out, what the forward read and wrote (saved), its scalar semantics, and which float bias wants a gradient
    args=(Arg("grad_out", "Tensor"), *(a.required() for a in (Q, K, V, BIAS, ALIBI_SLOPES)),
          *(Arg(n, t) for n, t in DENSE_RETURNS), *(a.required() for a in DENSE_PARAMS),
          Arg("bias_requires_grad", "bool"),
          # appended with defaults (positional calls of the 17 arguments above keep their meaning)
          SINKS, DOC_IDS, Arg("sinks_requires_grad", "bool", False), FILL, VERIFIED),
    returns=(("grad_q", "Tensor"), ("grad_k", "Tensor"), ("grad_v", "Tensor"), ("grad_bias", "Tensor"),
             ("grad_sinks", "Tensor")),
    family="dense_backward",
    doc="the gradients of both dense ops (grad_bias / grad_sinks are empty unless bias / sinks_requires_grad)",
    kernels={"backward": _DENSE_KERNELS["backward"]}, launchers={"backward": _DENSE_LAUNCHERS["backward"]},
    references={"backward": _DENSE_REFERENCES["backward"]}, grads=("q", "k", "v", "bias", "sinks"),
)
PAGED = OpDef(
    "paged_attention",
    args=(Arg("q", "Tensor"), Arg("k_cache", "Tensor"), Arg("v_cache", "Tensor"), Arg("block_table", "Tensor"),
          Arg("seq_lens", "Tensor"), ALIBI_SLOPES, SCALE, Arg("causal", "bool", True), Arg("window", "int", 0),
          SOFTCAP, SINKS, PAGED_EMPTY_ROWS_NAN),
    returns=(("out", "Tensor"),), family="paged", doc="attention over a paged KV cache (inference)",
    kernels={"forward": KernelSet("attnlower.lowering.kernels.paged_decode",
                                  ("_paged_attn_kernel", "_paged_reduce_kernel"))},
    launchers={"forward": ("attnlower.lowering.launch_paged", "paged_forward")},
    references={"forward": ("attnlower.lowering.reference", "reference_paged_forward")},
    opaque=True,
)

OPS: dict[str, OpDef] = {op.name: op for op in (FLASH, SLIDING, DENSE_BACKWARD, PAGED)}
# The ops a rewrite emits (the backward is only ever called by autograd).
FORWARD_OPS = tuple(name for name, op in OPS.items() if op.family != "dense_backward")


def kernel_names(op: str, direction: str | None = None) -> tuple[str, ...]:
    """The Triton kernels `op` launches (in `direction`, or in every direction), for reports and dumps."""
    kernels = OPS[op].kernels
    directions = [direction] if direction is not None else list(kernels)
    return tuple(name for d in directions if d in kernels for name in kernels[d].names)


def kernel_table() -> dict[str, list[tuple[str, tuple[str, ...], str]]]:
    """{op: [(module, kernel names, direction), ...]} for the ops a rewrite emits: the shape of
    attnlower/target.py's `_OP_KERNELS`, which it can become (`_OP_KERNELS = registry.kernel_table()`)."""
    return {name: [(ks.module, ks.names, direction) for direction, ks in OPS[name].kernels.items()]
            for name in FORWARD_OPS}
