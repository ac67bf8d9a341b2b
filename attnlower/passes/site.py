"""One attention site as the stages see it: the record each stage fills in, and the facts in it.

`AttentionSite` is the one record per site. Each stage of `pipeline.STAGES` reads what the stages
before it proved and adds its own fact, or refuses the site with the reason (`Refused`):

    find_anchors    anchor, spelling                    a softmax or an SDPA call
    score_chain     chain: AttentionChain               up to Q·Kᵀ and down to P·V: terms, scale, products
    resolve_kv      match: AttentionMatch               q/k/v traced to their sources (OperandRef, PagedRef)
    classify_masks  mask, paged_mask: MaskInfo          what the mask terms compute; as the paged op's mask
    analyze         decision: Decision                  the op and its AttentionSpec
    rewrite         replacement                         the op call inserted, the output's users rerouted
    validate        validated                           checked against the replaced region, or undone

A refused site keeps its reason and every later stage passes it by. `Context` is what the stages
share for one graph. The dataclasses' docstrings are the contracts between the stages.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.fx as fx

from .layout import Layout
from .vocabulary import sizes_equal, value_of

aten = torch.ops.aten


class Refused(Exception):
    """A stage cannot prove what the site needs: the site stays unfused, the message is the report's reason."""


# --------------------------------------------------------------------------------------------
# score_chain: what the walk from the anchor proved


@dataclass
class ScoreTerm:
    """One mask/bias applied to the scores.

    kind "bias": `scores += coef * node` (a bool or int node is the number it holds, True = 1: only
    `where`, `masked_fill` and SDPA's `attn_mask` make a bool a mask); "fill": `scores = value` where
    node is True; "keep": `scores = value` where node is False. Values and coefs already include every
    scalar multiplier applied after the term, so they are in the units of the softmax input.
    """

    kind: str
    node: fx.Node
    value: float
    score_shape: tuple = ()              # the scores' shape where the term is applied: it broadcasts against it
    score_dtype: torch.dtype | None = None  # the scores' dtype there: a bool / int bias is that kind of number
    row_inserted: bool = False           # the scores had no Tq dim (decode einsum): unsqueeze(-2) the term first
    speculated_from: tuple = ()          # module buffers its fill value was read from (guarded by the rewrite)


@dataclass
class HeadScale:
    """A per-head multiplier of the scores whose value is data (a learned temperature, SwinV2's
    `logit_scale.exp()`): `scores * node` (or `/ node` when `divide`), constant over the query and key
    positions, applied before every mask/bias term. The rewrite folds it into q (`q * node`), so the op's
    `scale` keeps only the static factor and autograd reaches the parameter through that product."""

    node: fx.Node
    divide: bool = False


@dataclass(frozen=True)
class Operand:
    """A product operand as the walk found it: `node`, read through `to_logical`, which maps the node's
    own layout to the logical `[B, H, T, D]` (it transposes kᵀ back, splits a flattened `B*H` batch,
    broadcasts a matmul batch)."""

    node: fx.Node
    to_logical: Callable[[Layout], Layout]


@dataclass(frozen=True)
class Sinks:
    """One logit per query head that joins the softmax denominator and adds no value (GPT-OSS, StreamingLLM):
    the op's `sinks` are `source.reshape(Hq) * scale`. `form` says how the source spelled it: "concat" (a
    column concatenated to the scores, dropped before P·V), "logsumexp" (`exp(s - logaddexp(lse, sink))`),
    "rescale" (`softmax(s) v * exp(lse - logaddexp(lse, sink))`); `at` is the node that brought it in."""

    source: fx.Node
    scale: float
    form: str
    at: fx.Node


@dataclass
class AttentionChain:
    """What the walk from an anchor proved, before the operands are traced to their sources.

    The softmax input equals `softcap(score_scale * q·kᵀ) (+/fill) terms`, times `head_scale` when there
    is one, with q, k, v the products' operands; `output` is the node whose value the fused op replaces,
    and `output_steps` turn the op's `[B, Hq, Tq, Dv]` result into that node's layout. `region` is every
    node the fused op replaces; `shape_reads` are (user, region node) pairs where a user outside the
    region reads only a region node's size (the rewrite re-points them).
    """

    spelling: str
    q_operand: Operand
    k_operand: Operand
    v_operand: Operand
    batch: object
    q_heads: object
    q_len: object
    k_len: object
    head_dim: object
    v_head_dim: object
    score_scale: float
    softcap: float = 0.0
    terms: list[ScoreTerm] = field(default_factory=list)
    is_causal: bool = False           # SDPA's is_causal (top-left)
    dropout_p: float = 0.0
    safe_softmax: bool = False        # fully masked rows give 0 in the source (SDPA / _safe_softmax)
    output: fx.Node | None = None
    output_steps: tuple[tuple[str, object], ...] = ()
    region: list[fx.Node] = field(default_factory=list)
    shape_reads: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)
    head_scale: HeadScale | None = None
    # the scores are Q·Kᵀ + Q2·K2ᵀ (a split head dim: absorbed MLA's latent + rotary parts): Q2's and K2's
    # operands; the op reads cat(q, q2) and cat(k, k2) along the head dim
    split_qk: tuple[Operand, Operand] | None = None
    sinks: Sinks | None = None        # a per-head sink logit in the softmax denominator


# --------------------------------------------------------------------------------------------
# resolve_kv: where q, k and v come from


@dataclass(frozen=True)
class OperandRef:
    """`source` after `steps` is the 4-D `[B, heads, T, D]` operand; its values times `scale`."""

    source: fx.Node
    steps: tuple[tuple[str, object], ...]
    heads: int
    scale: float


@dataclass(frozen=True)
class PagedRef:
    """K or V read from `pool` (after `pool_perm`: `[num_blocks, Hkv, block_size, D]`) via `table`."""

    pool: fx.Node
    pool_perm: tuple[int, ...]
    table: fx.Node            # [B, max_blocks] integer
    heads: object
    block_size: object
    length: object            # max_blocks * block_size: the gathered length
    scale: float
    head_dim: object = None   # read a prefix of the pool's head dim (`pool[..., :R]`, MLA's values); None: all of it


@dataclass(kw_only=True)
class AttentionMatch(AttentionChain):
    """A proven attention site, ready for the analyzer: its chain, with q/k/v given as views of nodes
    that stay in the graph (the softmax input equals `softcap(scale * q·kᵀ) (+/fill) terms`)."""

    q: OperandRef
    k: OperandRef
    v: OperandRef
    kv_heads: object
    scale: float
    paged: tuple[PagedRef, PagedRef] | None = None   # K and V gathered from block pools
    split: tuple[OperandRef, OperandRef] | None = None  # Q2 and K2 of a split head dim (chain.split_qk)
    paged_scale: float = 0.0                          # the score scale when reading K paged

    @classmethod
    def of(cls, chain: AttentionChain, **resolved) -> "AttentionMatch":
        """The match of `chain` once its operands are resolved (`resolved`: q, k, v, kv_heads, scale, ...)."""
        return cls(**{f.name: getattr(chain, f.name) for f in fields(AttentionChain)}, **resolved)


# --------------------------------------------------------------------------------------------
# classify_masks: what the mask computes


@dataclass(frozen=True)
class MaskInfo:
    """What a mask does to the scores, as far as it could be proven.

    kind: "none" | "causal" | "band" | "padding" | "causal+padding" | "band+padding" | "tensor";
        "document", "causal+document", "band+document" (packed sequences: also nothing across documents,
        `documents` the ids; data_dependent);
        the paged op's readings (`masks.classify_length_mask`): "length" (key j visible iff
        j < lengths[b]), "causal+length" (also j <= lengths[b] - Tq + i: the chunk's queries aligned to
        each sequence's end), "band+length" (also j > lengths[b] - Tq + i - window).
    causal: key j > i + off is masked (kinds "causal"/"band" and their "+padding" forms); for the kinds
        without padding nothing else is masked.
    bottom_right: the causal/band diagonal is aligned bottom-right (off = Tk - Tq; for the length kinds
        off = lengths[b] - Tq, aligned to each sequence's end); always False when Tq == Tk at every
        evaluated size.
    window: band width (kinds "band", "band+padding"): key j visible iff i + off - window < j <= i + off.
    data_dependent: the mask reads tensor data (an input, parameter, buffer or constant), not only sizes.
    reason: one line for the report: what was proven, or why nothing could be.
    lengths: the length kinds' tensor of lengths (what the paged op reads as `seq_lens`).
    speculated_from: the module buffers whose value (not only shape) the proof read: a structure proven
        from them holds only while they keep that value, so the rewrite guards them (`buffers.freeze`).

    Only kinds "none", "causal" and "band" with data_dependent=False let the analyzer drop the mask
    tensor and use the kernel's own causal/window logic; every other kind is passed on as a bias.
    """

    kind: str
    causal: bool = False
    bottom_right: bool = False
    window: int = 0
    data_dependent: bool = False
    reason: str = ""
    lengths: fx.Node | None = None     # the length kinds: the rank-1 integer node of lengths the mask reads
    speculated_from: tuple = ()        # module buffers (placeholders) whose value the proof read (buffers.py)
    documents: fx.Node | None = None   # the document kinds: the ids D (query i sees key j iff D[i + off] == D[j])
    document_roles: tuple = ()         # per dim of D: "b" (the batch), "pos" (the position), "one" (size 1)
    # (diff, ne, cumsum) computing D from positions P, when the proof relied on it (P bounds the keys): the
    # rewrite computes D from P itself, so the op reads what the proof was about (and validation draws P)
    documents_from_positions: tuple = ()


@dataclass(frozen=True)
class AlibiInfo:
    """A bias term proven to be ALiBi: on every key the site's mask leaves visible it equals
    `slopes[h] * (j - (i + off))` (the op's `alibi_slopes` convention), and it is finite everywhere.
    `term` is the ScoreTerm it replaces, `slopes` the fp32 [Hq] values (a constant of the graph),
    `speculated_from` the module buffers it was read from (guarded by the rewrite)."""

    term: object
    slopes: torch.Tensor
    speculated_from: tuple = ()
    reason: str = ""


# --------------------------------------------------------------------------------------------
# analyze: the op and what its kernels are specialized on


@dataclass(frozen=True)
class AttentionSpec:
    """Everything a kernel is specialized on. Kernels are generated from this, never from the graph."""

    op: str
    q_heads: object
    kv_heads: object
    head_dim: object                   # q / k (Dqk)
    dtype: str
    v_head_dim: object = None          # v and the output (Dv; MLA: differs from Dqk)
    causal: bool = False
    bottom_right: bool = False
    window: int = 0
    mask_kind: str = "none"
    bias_kind: str = "none"            # none | bool | float
    softcap: float = 0.0
    scale: float = 1.0
    dropout_p: float = 0.0
    empty_rows_nan: bool = False
    alibi: bool = False                # ALiBi slopes passed as `alibi_slopes` (proven from a bias term)
    sinks: bool = False                # a per-head sink logit passed as `sinks` (issue 21)
    documents: bool = False            # packed sequences: document ids passed as `doc_ids` (issue 21)
    fill: float | None = None          # masked scores take this value (the op's fill mode); None: -inf masking
    # the structure (causal / window / ALiBi) was proven from a module buffer's value: checked on the device each
    # call (the op's `verified`), the source's mask the op's bias when the check fails (Decision.fallback)
    verified: bool = False
    paged_block_size: int | None = None
    target: str = "cpu"

    def as_dict(self) -> dict:
        """The fields as plain values (symbolic sizes as text), for the report."""
        # not dataclasses.asdict: it deep-copies, and a symbolic size cannot be copied outside its graph
        return {f.name: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v))
                for f in fields(self) for v in [getattr(self, f.name)]}


@dataclass
class BiasPlan:
    """How to build the op's `bias` from the site's terms: a list of (term, as_bool) to combine."""

    kind: str = "none"                       # none | bool | float
    terms: list[ScoreTerm] = field(default_factory=list)


@dataclass
class PagedPlan:
    """Read K/V from their pools: `seq_lens` None means every gathered key is visible."""

    k: PagedRef
    v: PagedRef
    seq_lens: fx.Node | None


@dataclass
class Decision:
    """The analyzer's choice for a site: the spec, how to build the bias, the mask as proven, why."""

    spec: AttentionSpec
    bias: BiasPlan
    mask: MaskInfo
    reason: str
    paged: PagedPlan | None = None
    speculated: tuple = ()      # module buffers whose value a proof read: the rewrite guards them (buffers.freeze)
    alibi: AlibiInfo | None = None   # the slopes the op takes as `alibi_slopes` (spec.alibi)
    # with spec.verified: the source's mask terms, the op's `bias` when the device check finds the buffer changed
    fallback: BiasPlan | None = None


# --------------------------------------------------------------------------------------------
# the record


@dataclass
class AttentionSite:
    """The one record of an attention site: what each stage proved about it, or why it stays unfused."""

    index: int                  # its row in the graph's report (checkpoint bodies continue the count)
    anchor: fx.Node             # the softmax or SDPA call the site grew from
    spelling: str               # "softmax" / "sdpa": what the anchor is (the chain says how the products are spelled)
    refusal: str | None = None  # why the site stays unfused; None while it is not refused
    chain: AttentionChain | None = None
    match: AttentionMatch | None = None
    mask: MaskInfo | None = None          # its mask term classified (or its terms' conjunction, when all mask)
    paged_mask: MaskInfo | None = None    # where K/V are paged: the mask read as the paged op's (length kinds)
    alibi: AlibiInfo | None = None        # a bias term proven ALiBi on the keys `mask` leaves visible
    decision: Decision | None = None
    replaced: list[str] = field(default_factory=list)  # names of the nodes the rewrite replaced
    replacement: fx.Node | None = None    # the inserted node the replaced output's users now read
    validated: str = ""                   # what translation validation checked the rewrite on
    validation_repro: str | None = None   # the repro file of a rewrite that failed validation

    @property
    def open(self) -> bool:
        """Not refused: the next stage works on it."""
        return self.refusal is None

    @property
    def rewritten(self) -> bool:
        """Replaced by a fused op (and not refused afterwards, by validation)."""
        return self.refusal is None and self.replacement is not None

    def refuse(self, reason: str) -> None:
        """Leave the site unfused, for `reason` (the report's words)."""
        self.refusal = reason

    @property
    def location(self) -> str:
        """The user's source line of the anchor ("file.py:12 in f: code")."""
        return source_location(self.anchor)


@dataclass
class Context:
    """What the stages share while compiling one graph and the bodies of its checkpoint calls."""

    target: object                     # the Target the kernels are chosen for (attnlower/target.py)
    fake_mode: object                  # the fake mode of the graph's values (symbolic sizes live in its shape env)
    allowed_ops: tuple[str, ...]       # the fused ops a site may become (options["ops"])
    validate: bool = True              # check each rewrite against the region it replaced (options["validate"])
    repro_dir: str | None = None       # where a failed validation writes its repro
    check_stages: bool = False         # lint the graph and check every node's value between stages (options)
    sites: list[AttentionSite] = field(default_factory=list)   # every site, in report order
    in_checkpoint: bool = False        # the graph being worked on is the body of a torch.utils.checkpoint call

    def sites_in(self, gm: fx.GraphModule) -> list[AttentionSite]:
        """The sites of the graph `gm` (not of the other graph or bodies the context also holds)."""
        return [s for s in self.sites if s.anchor.graph is gm.graph]

    def open_sites(self, gm: fx.GraphModule) -> list[AttentionSite]:
        """The sites of `gm` that no stage has refused."""
        return [s for s in self.sites_in(gm) if s.open]


_FRAME = re.compile(r'File "([^"]+)", line (\d+)(?:, in (.*))?')


def source_frame(node: fx.Node) -> tuple[str, str, str, str] | None:
    """(file name, line, function, code) of the user's innermost frame that made `node`, from Dynamo's
    stack trace; None when the node has none."""
    stack = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in stack.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        found = _FRAME.match(lines[i])
        if found:
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return found.group(1).rsplit("/", 1)[-1], found.group(2), found.group(3) or "", code
    return None


def source_location(node: fx.Node) -> str:
    """The user's source line for a node ("file.py:12 in f: code"), or the node's name when unknown."""
    frame = source_frame(node)
    if frame is None:
        return node.name
    name, line, function, code = frame
    return f"{name}:{line} in {function}: {code}"[:160]


# ---- facts of one match, read by the analyzer and the rewrite alike

def problem_shape(m: AttentionMatch) -> list:
    """The attention problem's [B, Hq, Tq, Tk]."""
    return [m.batch, m.q_heads, m.q_len, m.k_len]


def adjacent_key_parts(m: AttentionMatch) -> fx.Node | None:
    """The buffer K1 and K2 of a split head dim are adjacent slices of (`buf[..., :R]`, `buf[..., R:]` under
    the same views: vLLM / FlashMLA keep the latent and the rotary key in one row), else None."""
    k1, k2 = m.k, m.split[1]
    a, b = k1.source, k2.source
    if not all(n.op == "call_function" and n.target is aten.slice.Tensor for n in (a, b)):
        return None
    base = a.args[0]
    rank = len(value_of(base).shape)
    if b.args[0] is not base or k1.steps != k2.steps or k1.heads != k2.heads:
        return None
    dims = {x.args[1] % rank if len(x.args) > 1 else 0 for x in (a, b)}
    if dims != {rank - 1} or any(len(x.args) > 4 and x.args[4] != 1 for x in (a, b)):
        return None
    end_a = value_of(a).shape[-1]
    start_a = a.args[2] if len(a.args) > 2 else 0
    start_b = b.args[2] if len(b.args) > 2 else 0
    if start_a not in (0, None) or not isinstance(start_b, int) or start_b != end_a \
            or not sizes_equal(end_a + value_of(b).shape[-1], value_of(base).shape[-1]):
        return None
    if any(kind == "unflatten" and arg[0] % rank == rank - 1 for kind, arg in k1.steps):
        return None
    return base
