"""The words every stage uses: the op families of an aten graph, and how to read a node.

Each family is defined once, here, and every stage imports it. Where a stage asks a narrower
question it derives its set from these, next to the reason (`SCORE_PASS_THROUGH`, `REPOINTABLE_SIZE_READS`).
Sets of OpOverloads are for the aten graphs the passes see; `op_name` / `op_names` give overload-packet
names (`aten.view.default` -> "view"), which the mask classifier matches so that torch-level calls
(copied from Dynamo's graph for tensor subclasses) read the same.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def op_names(ops) -> set[str]:
    """The overload-packet names of `ops` (`aten.view.default` -> "view"), for name-based matching."""
    return {op.overloadpacket.__name__ for op in ops}


def op_name(node: fx.Node) -> str:
    """The overload-packet name of an aten call, the method name of a call_method, else the function's name."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def rule_registrar(table: dict):
    """A decorator factory for a stage's table of rules per op family: `@rule(*ops)` enters the decorated
    function in `table` under each of `ops` (OpOverloads or op names, whichever the table is keyed by)."""
    def rule(*ops):
        def register(fn):
            for op in ops:
                table[op] = fn
            return fn
        return register
    return rule


# --------------------------------------------------------------------------------------------
# Ops that move or copy values without changing them. The stages combine the families they accept.

COPIES = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
          aten.lift_fresh_copy.default}
# Casts keep positions but change values' precision: a chain that casts to a lower precision
# between the source and the use is not a view for our purposes (the kernel would see more bits).
CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default}
MOVES = {aten.to.device}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.unflatten.int, aten.view_as.default, aten.reshape_as.default}
BROADCASTS = {aten.expand.default, aten.expand_as.default}
PERMUTES = {aten.permute.default, aten.transpose.int, aten.swapaxes.default, aten.swapdims.default, aten.t.default}
SQUEEZES = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}
SLICES = {aten.slice.Tensor, aten.select.int}
REPEATS = {aten.repeat_interleave.self_int}
# What `layout.Layout` can follow (a slice only when it takes everything: `layout._apply` checks).
LAYOUT_OPS = COPIES | CASTS | MOVES | RESHAPES | BROADCASTS | PERMUTES | SQUEEZES | REPEATS | {aten.slice.Tensor}
# On the score and probability chains: copies, casts and reshapes that keep the [.., Tq, Tk] dims
# (checked per node), and an expand that broadcasts nothing. A lifted constant is never the scores.
SCORE_PASS_THROUGH = (COPIES - {aten.lift_fresh_copy.default}) | CASTS | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
# A scalar constant keeps its value through these (a cast rounds it: `constants.constant_value` recasts).
CONSTANT_PRESERVING = COPIES | CASTS | {aten.expand.default, aten.detach_.default}


# --------------------------------------------------------------------------------------------
# Anchors, products and the ops between them

SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
# The ops a hand-written softmax starts from (`anchors.manual_softmax`): exp(x) / sum, exp(x - logsumexp),
# exp(log_softmax(x)). Together with SOFTMAX_OPS: the ops through which values reach P·V normalized.
SOFTMAX_FORMS = SOFTMAX_OPS | {aten.exp.default, aten.log_softmax.int, aten._log_softmax.default}
SDPA_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}
# The products a site's Q·Kᵀ and P·V may be (`products.product_operands` reads each one's operands).
PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default}
# Every matrix product, 2-D `mm` included (no site is anchored on one, but values still flow through it).
MATRIX_PRODUCTS = PRODUCTS | {aten.mm.default}
SCALES = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
MULTIPLIES = {aten.mul.Tensor, aten.mul.Scalar}
ADDS = {aten.add.Tensor, aten.add.Scalar}
SUBTRACTS = {aten.sub.Tensor, aten.sub.Scalar}
MASKED_FILLS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}
# where(cond, scores, fill) with the fill a tensor or a python number
WHERES = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}
DROPOUTS = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default,
            aten.alpha_dropout.default}
COMPARISONS = {getattr(aten, op).Tensor for op in ("lt", "le", "gt", "ge", "eq", "ne")}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Ops that read only the size (and dtype / device) of one argument, never its values:
# overload-packet name -> the index of that argument. Torch-level names included (`x.size()`).

SIZE_READERS = {
    "sym_size": 0, "sym_stride": 0, "sym_numel": 0, "sym_storage_offset": 0,
    "size": 0, "stride": 0, "numel": 0, "dim": 0,
    "expand_as": 1, "zeros_like": 0, "ones_like": 0, "full_like": 0, "empty_like": 0,
    "new_zeros": 0, "new_ones": 0, "new_full": 0, "new_empty": 0, "new_empty_strided": 0,
}
# ... of which these return the size itself (a number): their value depends on sizes alone.
SIZE_QUERIES = {"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "numel", "dim"}
# The size reads of a region node that the rewrite rebuilds from another tensor of the same sizes
# (`rewrite.repoint_size_reads` has one way per op), so the region's scores can die.
REPOINTABLE_SIZE_READS = {aten.sym_size.int, aten.expand_as.default, aten.zeros_like.default,
                          aten.ones_like.default, aten.full_like.default, aten.empty_like.default}
# Ops whose result is uninitialized memory: as unknowable as data.
UNINITIALIZED = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted"}
# In-place ops that change autograd metadata only, never the values (pre-dispatch graphs `detach_`
# every lifted tensor literal).
METADATA_ONLY_WRITES = {"detach_", "requires_grad_"}

assert {op.overloadpacket.__name__ for op in REPOINTABLE_SIZE_READS} <= set(SIZE_READERS)
assert SIZE_QUERIES <= set(SIZE_READERS)


def size_read_index(node: fx.Node) -> int | None:
    """The index of the argument whose size alone the call `node` reads (1 for `mask.expand_as(scores)`),
    when that argument is a node; else None."""
    if node.op != "call_function":
        return None
    index = SIZE_READERS.get(op_name(node))
    if index is None or len(node.args) <= index or not isinstance(node.args[index], fx.Node):
        return None
    return index


def reads_only_size(user: fx.Node, node: fx.Node) -> bool:
    """Does `user` read only the size of `node`, in a way the rewrite can re-point (`scores.size(0)`,
    `mask.expand_as(scores)`)? `node` must be no other argument of `user`."""
    if user.op != "call_function" or user.target not in REPOINTABLE_SIZE_READS:
        return False
    index = SIZE_READERS[op_name(user)]
    args = list(user.args)
    return len(args) > index and args[index] is node and all(
        a is not node for i, a in enumerate(args) if i != index) and node not in user.kwargs.values()


# --------------------------------------------------------------------------------------------
# Reading a node

def value_of(node):
    """The node's example value (`meta["val"]`: a FakeTensor, a SymInt, ...), or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: fx.Node) -> list[object]:
    """The sizes of the tensor a node computes (ints or SymInts)."""
    return list(value_of(node).shape)


def sizes_equal(a, b) -> bool:
    """a == b for sizes (ints or SymInts: a symbolic comparison records a guard, so it holds for every
    size the graph is reused for)."""
    return bool(a == b)


def is_one(x) -> bool:
    """Whether a size is 1 (an int, or a SymInt equal to 1 under the shape env)."""
    return isinstance(x, int) and x == 1 or (not isinstance(x, int) and bool(x == 1))


def ancestors(roots, inputs_of=lambda n: n.all_input_nodes) -> set[fx.Node]:
    """`roots` and every node they read, transitively (`inputs_of(node)`: the inputs followed; all by default)."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(inputs_of(node))
    return seen


def static_size(size):
    """An int for a size that is one (a SymInt whose expression is a number), else the size as it is."""
    if isinstance(size, torch.SymInt) and size.node.expr.is_number:
        return int(size.node.expr)
    return size


def size_hint(size) -> int | None:
    """An int size, or the example value's hint of a symbolic one (None when there is neither).

    Never `int(symint)`: that installs a guard `Eq(s, hint)` and Dynamo then recompiles for every
    new length. Reports only need the hint, so they read it without guarding.
    """
    if isinstance(size, torch.SymInt):
        hint = getattr(size.node, "hint", None)
        return int(hint) if hint is not None else None
    try:
        return int(size)
    except (TypeError, ValueError, RuntimeError):
        return None


def size_sources(shape, before: fx.Node, exclude: set) -> list | None:
    """For each size of `shape`: the int, or a (node, dim) / SymInt node outside `exclude` and before
    `before` that holds the same (symbolic) size; None when one has no such source."""
    graph_nodes = list(before.graph.nodes)
    earlier = graph_nodes[:graph_nodes.index(before)]
    out = []
    for size in shape:
        if isinstance(size, int):
            out.append(size)
            continue
        found = None
        for n in earlier:
            if n in exclude:
                continue
            val = n.meta.get("val")
            if isinstance(val, torch.SymInt) and val.node.expr == size.node.expr:
                found = n
                break
            if isinstance(val, torch.Tensor):
                dims = [d for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt) and s.node.expr == size.node.expr]
                if dims:
                    found = (n, dims[0])
                    break
        if found is None:
            return None
        out.append(found)
    return out
