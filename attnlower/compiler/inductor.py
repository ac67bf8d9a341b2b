"""Hand the rewritten graph to Inductor, with Inductor's own attention fusion off.

attnlower owns attention: every site it could fuse is already one `attnlower` op, and every softmax
left in the graph was left there on purpose (its probabilities are used elsewhere, the softmax is
over another dim, the scale is data, ...). Inductor's joint-graph pass `fuse_attention` ("sfdp")
pattern-matches softmax/matmul chains into `scaled_dot_product_attention`. Letting it run on what
we refused would undo the refusal, and it is wrong on at least one of them: torch 2.13's pattern
matches `softmax(q @ k.T, dim=-2) @ v` and returns SDPA's softmax over the last dim (max abs error
~1 on random inputs; `tests/test_spellings.py::test_negative[softmax_other_dim-inductor]`).

So while `compile_fx` runs on an attnlower graph, the sfdp entries are taken out of Inductor's
joint-graph pattern tables and put back afterwards. Every other pattern (pad_mm, misc) stays.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Sequence

import torch
import torch.fx as fx

_SFDP_MODULE = "torch._inductor.fx_passes.fuse_attention"


def _is_sfdp(entry) -> bool:
    """An entry registered by `fuse_attention`: its name (torch ≥ 2.12) or what its check closes over."""
    name = getattr(entry, "pattern_name", None)
    if isinstance(name, str) and name.startswith("_sfdp"):
        return True
    check = getattr(entry, "extra_check", None)
    if getattr(check, "__module__", None) == _SFDP_MODULE:
        return True
    for cell in getattr(check, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(content) and getattr(content, "__module__", None) == _SFDP_MODULE:
            return True
    return False


@contextlib.contextmanager
def without_sfdp() -> Iterator[None]:
    """Inductor's joint-graph passes run without the fuse_attention patterns inside this block.

    `joint_graph.lazy_init` registers the patterns the first time a graph (per device) reaches the
    joint-graph passes, so it is wrapped: after it runs, sfdp entries are removed. Whatever was removed
    is restored on exit, so plain `torch.compile(backend="inductor")` in the same process is unchanged.
    """
    from torch._inductor.fx_passes import joint_graph

    # `patterns` is also one of `pass_patterns`: each table once, by identity
    tables = list({id(t): t for t in (joint_graph.patterns, joint_graph.early_patterns,
                                      *getattr(joint_graph, "pass_patterns", []))}.values())
    saved: list[tuple[list, list]] = []   # (the table's entry list, its entries before stripping)

    def strip() -> None:
        for table in tables:
            for entries in table.patterns.values():
                kept = [e for e in entries if not _is_sfdp(e)]
                if len(kept) != len(entries):
                    saved.append((entries, list(entries)))
                    entries[:] = kept

    original_init = joint_graph.lazy_init

    def lazy_init(*args, **kwargs):
        result = original_init(*args, **kwargs)
        strip()
        return result

    joint_graph.lazy_init = lazy_init
    try:
        strip()
        yield
    finally:
        joint_graph.lazy_init = original_init
        for entries, before in reversed(saved):  # reversed: a list stripped twice ends at its first state
            entries[:] = before


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], mode: str = "default",
                          dynamo_gm: fx.GraphModule | None = None):
    """Compile `gm` with Inductor as `torch.compile(mode=mode)` would, with sfdp off.

    `mode` is one of Inductor's modes (`torch._inductor.list_mode_options()`): "reduce-overhead" turns
    on CUDA graphs, "max-autotune" autotuning and CUDA graphs, ... The compile goes through the same
    wrapper `torch.compile(backend="inductor", mode=mode)` builds, so every mode means exactly what it
    means there. `dynamo_gm` is the graph Dynamo handed the backend: its facts about the inputs are
    kept on `gm` (`keep_dynamo_input_facts`), so parameters stay static inputs under CUDA graphs.
    """
    if dynamo_gm is not None and dynamo_gm is not gm:
        keep_dynamo_input_facts(dynamo_gm, gm)
    with without_sfdp(), keyed_on_op_schemas():
        return _inductor_for_mode(mode)(gm, example_inputs)


@contextlib.contextmanager
def keyed_on_op_schemas() -> Iterator[None]:
    """Within: Inductor's and AOTAutograd's on-disk caches key on attnlower's op schemas.

    Their keys hold the graph's code, which names an op but not its schema. A compiled backward cached before an
    op gained an argument then calls it with the old positional list: `flash_attention_backward` got `True` where
    `doc_ids` now sits (seen 2026-12-03 on a machine whose cache predated `doc_ids`; a fresh cache dir passed).
    A no-op post-grad pass whose uuid is the schemas' hash puts them in the key (Inductor hashes a custom pass's
    uuid). A pass the user set stays theirs, and then the key is theirs too."""
    from torch._inductor import config

    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:   # a torch without custom passes: nothing to key on
        yield
        return
    if config.post_grad_custom_post_pass is not None:
        yield
        return

    class _SchemaKey(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return _schema_hash()

    with config.patch(post_grad_custom_post_pass=_SchemaKey()):
        yield


@functools.lru_cache(maxsize=1)
def _schema_hash() -> str:
    import hashlib

    from attnlower.lowering import registry

    text = "\n".join(f"{op.qualname}{op.schema}" for op in registry.OPS.values())
    return hashlib.sha256(text.encode()).hexdigest()


def _inductor_for_mode(mode: str):
    wrapper = getattr(torch, "_TorchCompileInductorWrapper", None)
    if wrapper is not None:
        return wrapper(mode, None, None)    # (mode, options, dynamic): what torch.compile builds
    from torch._inductor import list_mode_options   # older torch: the same patches by hand
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode and mode != "default" else {}
    return lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches)


# What Dynamo records on the graph it hands a backend, which AOTAutograd reads back to tell static
# inputs (parameters, buffers) from per-call inputs: CUDA graphs copy every non-static input into the
# graph's buffers on every replay, so a graph without these facts copies all the weights each step.
_DYNAMO_GRAPH_META = ("dynamo_compile_id", "dynamo_flat_name_to_original_fqn", "backend_id",
                      "cudagraph_annotation")


def keep_dynamo_input_facts(dynamo_gm: fx.GraphModule, gm: fx.GraphModule) -> bool:
    """Copy Dynamo's facts about the graph inputs from `dynamo_gm` onto `gm`, the aten graph traced from it
    (same placeholders, same order): each placeholder's source and static-input type, the graph's
    compile id and parameter sources. Returns whether they were copied; when the two graphs do not
    correspond one to one, nothing is copied (Inductor then treats every input as dynamic: correct,
    only slower under CUDA graphs)."""
    if "dynamo_compile_id" not in dynamo_gm.meta or not hasattr(dynamo_gm, "_param_name_to_source"):
        return False    # not a Dynamo graph (export, a test's hand-made graph): nothing to keep
    theirs = list(dynamo_gm.graph.find_nodes(op="placeholder"))
    ours = list(gm.graph.find_nodes(op="placeholder"))
    sources = dynamo_gm._param_name_to_source
    if len(theirs) != len(ours):
        return False
    _constants_as_attributes(gm, sources)
    params = [name for name, _ in gm.named_parameters(remove_duplicate=False)] + \
             [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    if any(name not in sources for name in params):
        return False
    for mine, dynamos in zip(ours, theirs):
        mine._dynamo_source = getattr(dynamos, "_dynamo_source", None)
        if "tensor_dict" in dynamos.meta:
            mine.meta["tensor_dict"] = dynamos.meta["tensor_dict"]
    for key in _DYNAMO_GRAPH_META:
        if key in dynamo_gm.meta:
            gm.meta[key] = dynamo_gm.meta[key]
    gm._param_name_to_source = {name: sources[name] for name in params}
    return True


def _constants_as_attributes(gm: fx.GraphModule, sources) -> None:
    """The aten trace registers the tensors it captured as constants (`_tensor_constant0`: a lifted
    `torch.tensor(...)`, an arange folded by the trace) as buffers. They have no Dynamo source, and
    AOTAutograd asks a source of every parameter and buffer of a Dynamo graph; as plain tensor
    attributes they are what they are, constants of the graph (Inductor folds them in)."""
    for name, _ in list(gm.named_buffers(remove_duplicate=False)):
        if name in sources or not name.rsplit(".", 1)[-1].startswith("_tensor_constant"):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        value = owner._buffers.pop(attr)
        setattr(owner, attr, value)
