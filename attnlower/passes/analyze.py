"""Stage analyze: shapes + the mask as proven + Target -> the op and its AttentionSpec, or a refusal.

`analyze_site` is the choice for one site (the table in docs/ARCHITECTURE.md: paged when K/V are
gathered from block pools, sliding for a band, flash otherwise); the stage adds the policy of where
the site is: dropout inside a torch.utils.checkpoint body is refused, since the backward's
recomputation would not replay the op's dropout mask.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..lowering.plan import MAX_HEAD_DIM, PAGED_MAX_HEAD_DIM_QK, PAGED_MAX_HEAD_DIM_V   # the kernels' head-dim limits
from .site import (AlibiInfo, AttentionMatch, AttentionSpec, BiasPlan, Context, Decision, MaskInfo, PagedPlan,
                   Refused, ScoreTerm, adjacent_key_parts, problem_shape)
from .masks import DOCUMENT_KINDS, LENGTH_KINDS
from .visibility import MASKED
from .layout import NotAView, lift_to_problem
from .vocabulary import shape_of, size_sources, sizes_equal, value_of


def analyze(gm: fx.GraphModule, ctx: Context) -> str:
    """Choose the op of each open site of `gm` (`site.decision`), or refuse it with the reason."""
    chosen: dict[str, int] = {}
    for site in ctx.open_sites(gm):
        try:
            decision = analyze_site(site.match, ctx.target, ctx.allowed_ops, site.mask, site.paged_mask, site.alibi)
        except Refused as e:
            site.refuse(str(e))
            continue
        site.decision = decision
        if ctx.in_checkpoint and decision.spec.dropout_p:
            # the checkpoint's recomputation would draw a new dropout mask for the op (no RNG replay)
            site.refuse("dropout inside torch.utils.checkpoint: the recomputation would not replay the mask")
            continue
        chosen[decision.spec.op] = chosen.get(decision.spec.op, 0) + 1
    return ", ".join(f"{n} {op}" for op, n in chosen.items()) or "no op chosen"


def _documents_note(documents: MaskInfo | None) -> str:
    if documents is None:
        return ""
    ids = documents.documents
    return (f"; documents `{ids.name}` {list(shape_of(ids))} passed as doc_ids: key blocks of other documents "
            f"skipped")


def _sinks_note(m: AttentionMatch) -> str:
    if m.sinks is None:
        return ""
    how = {"concat": f"a column concatenated to the scores at {m.sinks.at.name}, dropped before P·V",
           "logsumexp": f"logaddexp with the row's logsumexp at {m.sinks.at.name}",
           "rescale": f"the output rescaled by exp(lse - logaddexp(lse, sink)) at {m.sinks.at.name}"}[m.sinks.form]
    return f"; per-head sinks `{m.sinks.source.name}` in the softmax denominator ({how})"


def head_dim_problem(head_dim, v_head_dim, limit_qk: int, limit_v: int, kernels: str) -> str:
    """Why the head dims exceed what `kernels` keep in registers (q/k up to `limit_qk`, v up to `limit_v`), or "".
    Dv may differ from Dqk (MLA: 192 / 128): each dim has its own tile."""
    for what, dim, limit in (("q/k", head_dim, limit_qk), ("v", v_head_dim, limit_v)):
        if isinstance(dim, int) and dim > limit:
            return (f"{what} head dim {dim} > {limit}: {kernels} keep a whole head of {what} in registers "
                    f"(expected {what}'s head dim <= {limit})")
    return ""


def _empty_rows_note(m: AttentionMatch, mask: MaskInfo, nan_for_empty: bool) -> str:
    """What the paged rewrite gives the rows with no visible key, said as the source's value."""
    if mask.lengths is None:
        return ""
    value = "NaN, as the source's softmax gives" if nan_for_empty else "0, as the source's safe softmax (SDPA) gives"
    chunk = not (isinstance(m.q_len, int) and m.q_len == 1)
    rows = ("queries before their sequence's first token (position L[b] - Tq + i < 0, a chunk longer than its "
            "sequence) and the rows of an empty sequence" if chunk and mask.causal
            else "the rows of an empty sequence (L[b] = 0)")
    return f"; {rows} see no key: {value} (empty_rows_nan={nan_for_empty})"


def _paged_decision(m: AttentionMatch, target, allowed_ops, paged_mask: MaskInfo | None) -> tuple[Decision | None, str]:
    """Paged attention when K/V are block-table gathers and the mask is one the paged op computes
    (`paged_mask`, read by `masks.classify_length_mask`): none, `key < lengths[b]`, and causal or a
    causal band within the chunk, aligned to each sequence's end."""
    pk, pv = m.paged
    if "paged_attention" not in allowed_ops:
        return None, "paged_attention is not among the enabled ops"
    if m.dropout_p:
        return None, "dropout on a paged cache"
    if m.is_causal:
        return None, "is_causal on a gathered cache (top-left causal is not the paged op's alignment)"
    if not (bool(pk.block_size == pv.block_size) and bool(pk.heads == pv.heads)):
        return None, "K and V pools differ in block size or heads"
    problem = head_dim_problem(m.head_dim, m.v_head_dim, PAGED_MAX_HEAD_DIM_QK, PAGED_MAX_HEAD_DIM_V, "the paged kernel")
    if problem:
        return None, problem
    mask = paged_mask if paged_mask is not None else MaskInfo("none", reason="no mask")
    if mask.kind not in ("none",) + LENGTH_KINDS:
        return None, f"the mask is not one the paged op computes: {mask.reason}"
    seq_lens = mask.lengths
    if seq_lens is None and not bool(m.q_len <= pk.length):
        return None, f"Tq = {m.q_len} queries over {pk.length} gathered keys: more queries than the sequence holds"
    # what the source gives a row with no visible key (a sequence of length 0; causal: a query before its sequence's
    # first token, L[b] - Tq + i < 0): NaN from eager's softmax, 0 from SDPA's safe softmax. The op gives the same
    # under empty_rows_nan (passed always: it also lets a chunk be longer than its sequence, which the lengths, data,
    # never rule out); with sinks a row is empty only where its sink is -inf, in the source as in the op
    nan_for_empty = bool(m.terms) and seq_lens is not None and not m.safe_softmax
    if m.sinks is not None and m.sinks.form == "rescale" and nan_for_empty:
        # softmax(s) of an empty row is NaN and NaN times the weight stays NaN; the op with a finite sink gives 0
        return None, (f"the sinks rescale the output of a softmax whose {mask.kind} mask can leave a row with no "
                      f"visible key: eager gives NaN there, the op with sinks 0")
    dtype = value_of(m.q.source).dtype
    spec = AttentionSpec(
        op="paged_attention", q_heads=m.q_heads, kv_heads=pk.heads, head_dim=m.head_dim, v_head_dim=m.v_head_dim,
        sinks=m.sinks is not None,
        dtype=str(dtype).replace("torch.", ""), causal=mask.causal, bottom_right=mask.bottom_right,
        window=mask.window, mask_kind=mask.kind, softcap=m.softcap, scale=m.paged_scale, empty_rows_nan=nan_for_empty,
        paged_block_size=pk.block_size, target=target.describe())
    why = (f"K/V gathered from a block pool (block {pk.block_size}) through {pk.table.name}: "
           f"read in place, no gather" + (f"; lengths from {seq_lens.name}: {mask.reason}" if seq_lens is not None
                                          else "; every gathered key visible"))
    why += (_empty_rows_note(m, mask, nan_for_empty) + _sinks_note(m)
            + _buffer_note(mask, mask.speculated_from, None, "the paged op takes no `verified`"))
    return Decision(spec=spec, bias=BiasPlan(), mask=mask, reason=why, paged=PagedPlan(pk, pv, seq_lens),
                    speculated=mask.speculated_from + _fill_buffers(m, mask.speculated_from)), ""


def analyze_site(m: AttentionMatch, target, allowed_ops: tuple[str, ...], classified: MaskInfo | None = None,
                 paged_mask: MaskInfo | None = None, alibi: AlibiInfo | None = None) -> Decision:
    """Choose the op for a proven site on `target` (a Target: attnlower/target.py), or raise Refused with the reason.

    `classified` is the classification of the site's mask term (or of its terms' conjunction) and
    `paged_mask` the mask read as the paged op's, where K/V are paged (stage classify_masks); a site with
    one term must come with its classification. `alibi`: a bias term proven ALiBi on the keys the other
    terms (then `classified`) leave visible.
    """
    qv = value_of(m.q.source)
    dtype = qv.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise Refused(f"q is {dtype}; the fused ops take floating point")
    if dtype == torch.float64 and target.kind == "cuda":
        raise Refused("float64 on CUDA: the Triton kernels compute in fp16/bf16/fp32")
    for name, ref in (("k", m.k), ("v", m.v)):
        if value_of(ref.source).dtype != dtype:
            raise Refused(f"{name} is {value_of(ref.source).dtype} but q is {dtype}")
    dense_problem = head_dim_problem(m.head_dim, m.v_head_dim, MAX_HEAD_DIM, MAX_HEAD_DIM, "the dense kernels")
    if dense_problem and m.paged is None:
        raise Refused(dense_problem)
    if not bool(m.q_heads % m.kv_heads == 0):
        raise Refused(f"{m.q_heads} query heads are not a multiple of {m.kv_heads} K/V heads")
    if not math.isfinite(m.scale) or m.scale <= 0:
        raise Refused(f"scale {m.scale} is not a positive finite number")

    paged_note = ""
    if m.paged is not None:
        decision, paged_note = _paged_decision(m, target, allowed_ops, paged_mask)
        if decision is not None:
            decision.reason += _head_scale_note(m)
            return decision
        if dense_problem:
            raise Refused(f"{dense_problem} (a paged gather was seen, but {paged_note})")
        paged_note = f" (a paged gather was seen, but {paged_note}: dense path on the gathered K/V)"

    causal, bottom_right, window = m.is_causal, False, 0
    speculated: tuple = ()
    documents = None
    mask = MaskInfo(kind="causal" if causal else "none", causal=causal,
                    reason="SDPA is_causal=True (top-left)" if causal else "no mask")
    bias = BiasPlan()
    terms = [t for t in m.terms]
    finite = [t for t in terms if t.kind in ("fill", "keep") and not (t.value == float("-inf") or t.value <= MASKED)]
    fill_note, fill = "", None
    for t in terms:
        problem = lift_problem(t, m)
        if problem:
            raise Refused(problem)
    if causal and terms:
        raise Refused("SDPA with both is_causal and attn_mask")
    alibi_used = None
    if alibi is not None:
        info = classified
        if (info is not None and info.kind in ("causal", "band") and not info.data_dependent
                and (not info.bottom_right or bool(m.q_len <= m.k_len))):
            # the masks are the op's causal / band pattern and the bias its ALiBi on what they leave visible
            causal, bottom_right, window = info.causal, info.bottom_right, info.window
            speculated = info.speculated_from + alibi.speculated_from
            mask = MaskInfo(info.kind, causal=info.causal, bottom_right=info.bottom_right, window=info.window,
                            reason=f"{info.reason}; {alibi.reason}", speculated_from=speculated)
            terms, classified, alibi_used = [], None, alibi
        else:
            classified = None       # the terms stay one combined bias
    if len(terms) == 1 and classified is None:
        raise ValueError("analyze_site: a site with one mask term needs its classification "
                         "(masks.classify_mask of the term; the classify_masks stage records it)")
    if finite and m.sinks is not None and all(t.value <= SINK_FILL for t in finite):
        # every row keeps its sink as a visible logit: a filled key weighs exp(fill - max) <= exp(fill - sink),
        # 0 in fp32 as for -inf, for any sink above fill + 104 (fp16's finfo.min: every sink fp16 can hold but
        # the 104 lowest)
        fill_note = (f"; the fill {max(t.value for t in finite):g} is -inf masking: every row keeps its sink, "
                     f"a filled key weighs exp(fill - sink) = 0 in fp32 for any sink above fill + {EXP_UNDERFLOW:g}")
    elif finite:
        # a finite fill is -inf masking where proven (`_finite_fill_problem`: the kernels then skip masked blocks
        # outright); else the op's fill mode computes it exactly (masked scores take the value)
        problem = _finite_fill_problem(m, finite, classified)
        if problem:
            fill = _fill_mode_value(terms, finite, problem)
            fill_note = (f"; masked keys take {fill:g} as the source's fill does (op fill mode: a row with every key "
                         f"masked averages all Tk keys, as eager does); not -inf masking: {problem}")
        else:
            fill_note = _finite_fill_note(m, finite)
        buffers = [b for t in finite for b in t.speculated_from]
        if buffers:
            from .buffers import describe_guard
            fill_note += (f" (the fill read from the value of buffer `{buffers[0].name}`, "
                          f"{describe_guard(buffers[0])}; a write through its `.data` or a NumPy alias is not seen: "
                          "the op takes the value, not the buffer)")
    if terms and classified is not None:
        t = terms[0]
        info = classified
        if len(terms) == 1 and t.kind == "bias" and t.value != 1.0:
            # a factor moves finite masking values (finfo.min * 1e-10 no longer masks): only the sum is exact
            info = MaskInfo(kind="tensor", reason=f"bias enters the scores times {t.value:g}")
        mask = info
        pure = info.kind in ("none", "causal", "band") and not info.data_dependent
        # A pure causal/band mask never empties a row when every query sees its diagonal key; in fill mode an
        # empty row is the uniform average the op's fill gives it too.
        diagonal_visible = not info.bottom_right or bool(m.q_len <= m.k_len) or fill is not None
        if pure and info.kind == "none":
            terms, speculated, fill = [], info.speculated_from, None
        elif pure and diagonal_visible:
            causal, bottom_right, window = info.causal, info.bottom_right, info.window
            terms, speculated = [], info.speculated_from
        elif (info.kind in ("causal+padding", "band+padding") and (fill is not None or _masks_with_minus_inf(terms))
              and not info.speculated_from):
            # the structure lets the kernel skip key blocks; the mask stays the keep-mask (its hidden keys include
            # the structure's). Exact where a hidden key weighs the same visited or skipped: -inf (nothing), or the
            # fill (the op's fill mode adds the skipped blocks). Not for a finite masking value (finfo.min as a
            # float bias): a row with every key hidden averages all Tk keys there, the skipped ones too. Not from a
            # buffer's value: the op's device check (`verified`) would drop the padding with the bias; the bias
            # alone reads the buffer each call, exact whatever is written to it
            causal, bottom_right, window = info.causal, info.bottom_right, info.window
        elif info.kind in DOCUMENT_KINDS and bool(m.q_len <= m.k_len):
            # packed sequences: the op's document mode (doc_ids), its own causal / window within documents
            causal, bottom_right, window = info.causal, info.bottom_right, info.window
            terms, speculated, documents = [], info.speculated_from, info
    elif terms:
        what = "keep-mask" if fill is not None else "bias"
        mask = MaskInfo(kind="tensor", reason=f"{len(terms)} mask/bias terms combined into one {what}")
    if terms:
        as_bool = (fill is not None
                   or len(terms) == 1 and terms[0].kind in ("fill", "keep") and terms[0].value == float("-inf"))
        bias = BiasPlan(kind="bool" if as_bool else "float", terms=terms)
    fallback, unchecked = None, ""      # unchecked: why a structure read off a buffer has the host guard alone
    if speculated and documents is not None:
        unchecked = ("the device check compares the whole mask with the structure, and this mask also holds the "
                     "documents the op takes as doc_ids")
    elif speculated and not terms:
        # the structure (or ALiBi) was proven from a buffer's value: the host guard recompiles on a change it sees,
        # the op checks the value on the device each call for the writes it does not see (`.data`, NumPy aliases)
        fallback, fill = _fallback_bias(m.terms, finite, fill)
        if fallback is None:
            unchecked = ("the mask as a dense bias would need two fills, or a fill beside a -inf mask or an additive "
                         "term, which the op does not take")
        elif m.sinks is not None and m.sinks.form == "rescale" and not m.safe_softmax and fill is None:
            fallback = None     # the fallback can leave a row empty: NaN in eager, 0 under the sinks (refused below)
            unchecked = ("the mask as a dense bias could leave a row with no visible key, where eager's softmax gives "
                         "NaN and the op with sinks 0")

    op = "sliding_window_attention" if window > 0 else "flash_attention"
    if op not in allowed_ops:
        raise Refused(f"{op} is not among the enabled ops {list(allowed_ops)}")
    if m.sinks is not None and m.sinks.form == "rescale" and bias.kind != "none" and not m.safe_softmax and fill is None:
        # softmax(s) of a fully masked row is NaN and NaN times the weight stays NaN; the op gives 0
        raise Refused(f"the sinks rescale the output of a softmax whose {mask.kind} mask can leave a row with no "
                      f"visible key: eager gives NaN there, the op with sinks 0")
    # what the source gives a row with no visible key: NaN (eager softmax) or 0; with sinks such a row is empty
    # only when its sink is -inf (the op gives NaN there under empty_rows_nan, as eager's 0 / 0), else 0 for both
    # (in fill mode no row is empty: a row with every key masked averages them)
    empty_rows_nan = bool((bias.kind != "none" or fallback is not None) and not m.safe_softmax and fill is None)
    spec = AttentionSpec(
        op=op, q_heads=m.q_heads, kv_heads=m.kv_heads, head_dim=m.head_dim, v_head_dim=m.v_head_dim, dtype=str(dtype).replace("torch.", ""),
        causal=causal, bottom_right=bottom_right, window=window, mask_kind=mask.kind, bias_kind=bias.kind,
        softcap=m.softcap, scale=m.scale, dropout_p=m.dropout_p, empty_rows_nan=empty_rows_nan,
        alibi=alibi_used is not None, sinks=m.sinks is not None, documents=documents is not None,
        fill=fill, verified=fallback is not None, target=target.describe(),
    )
    why = (_why(spec, mask) + _buffer_note(mask, speculated, fallback, unchecked) + fill_note + _lift_note(bias.terms, m)
           + paged_note + _split_note(m) + _sinks_note(m) + _documents_note(documents) + _head_scale_note(m))
    speculated += _fill_buffers(m, speculated)
    return Decision(spec=spec, bias=bias, mask=mask, reason=why, speculated=speculated, alibi=alibi_used,
                    fallback=fallback)


def _fallback_bias(terms: list[ScoreTerm], finite: list[ScoreTerm], fill: float | None
                   ) -> tuple[BiasPlan | None, float | None]:
    """The source's mask terms as the op's `bias` where the device check finds the buffer changed, and the fill
    both calls then take: (None, fill) when the terms are not one bias the op computes exactly (two finite fills,
    or one beside an additive term), and the host guard alone stands.

    A finite fill is the op's fill mode on both calls (also where it was proven -inf masking for the structure:
    the proof does not hold for what the buffer now holds, and fill mode computes the structure exactly too);
    otherwise a bool keep-mask for -inf masks, else the terms summed as a float bias (-inf, or <= -1e30: masked)."""
    if finite:
        try:
            value = _fill_mode_value(terms, finite, "the fallback")
        except Refused:
            return None, fill
        return BiasPlan(kind="bool", terms=list(terms)), value
    return BiasPlan(kind="bool" if _masks_with_minus_inf(terms) else "float", terms=list(terms)), fill


def _buffer_note(mask: MaskInfo, speculated: tuple, fallback: BiasPlan | None, unchecked: str) -> str:
    """What keeps a pattern read off a module buffer's value true, in the report's words. Three cases:
    the op computes the structure (`speculated`: the rewrite guards the buffers on the host, `buffers.freeze`)
    and checks them on the device each call (`fallback`: the op's `verified`); the same with the host guard
    alone (`unchecked` says why); or the structure is not the op's (`mask.speculated_from` not in `speculated`):
    the op's bias reads the buffer each call, exact whatever is written to it, and this site guards nothing."""
    from .buffers import describe_guard

    if speculated:
        guarded = "; " + "; ".join(describe_guard(b) for b in speculated)
        if fallback is not None:
            # the check reads the mask's [Tq, Tk] slice once per call (buffers.py)
            return guarded + ("; checked on the device each call as well (the op's `verified`): a write the guard "
                              "does not see (through `.data`, a NumPy alias) makes the op apply the source's mask as a "
                              "dense bias, every key block visited")
        return (guarded + "; not checked on the device" + (f" ({unchecked})" if unchecked else "")
                + ": a write through the buffer's `.data` or a NumPy alias is not seen")
    read = [b for b in mask.speculated_from if b not in speculated]
    if not read:
        return ""
    names = ", ".join(f"`{b.name}`" for b in read)
    structure = mask.kind.split("+")[0]
    why = (" (beside padding: a device check that passes makes the op ignore its bias, the padding with it)"
           if mask.kind.endswith("+padding") else "")
    unused = f"; the {structure} pattern its value holds skips no key block{why}" if structure in ("causal", "band") else ""
    return (f"; no guard needed: the op's bias reads {names} each call, so any write to it (in place, a new tensor, "
            f"through `.data`) is seen{unused}")


def _masks_with_minus_inf(terms) -> bool:
    """Every term hides keys with -inf (a keep / fill mask of -inf): a hidden key weighs exactly 0."""
    return bool(terms) and all(t.kind in ("fill", "keep") and t.value == float("-inf") for t in terms)


def _fill_buffers(m: AttentionMatch, already: tuple) -> tuple:
    """The module buffers the site's fill values were read from (a fill baked into the op, or the bias built from
    the term): guarded and frozen by the rewrite, as a buffer a structure was proven from."""
    return tuple(b for t in m.terms for b in t.speculated_from if b not in already)


# With sinks, a finite fill at or below this masks as -inf does (fp16's finfo.min, what HF fills fp16 masks with):
# the sink stays visible in every row, and a learned logit does not sit within EXP_UNDERFLOW of it.
SINK_FILL = float(torch.finfo(torch.float16).min)

# fp32 exp(x) is exactly 0 for x < ln(2^-150) = -103.97 (2^-149 is the smallest denormal; the kernels' exp2 of
# x * log2(e) underflows at the same point): a masked key whose score is this far below its row's maximum
# weighs exactly 0, as a -inf one does.
EXP_UNDERFLOW = 104.0


def visible_score_bound(m: AttentionMatch) -> tuple[float, str] | None:
    """(B, why) with |s| <= B for every finite score at the softmax input, proven from the chain alone, or
    None. Data cannot be bounded; what can: a softcap (|s| <= cap), or a Q·Kᵀ product computed in a dtype
    whose finite values are bounded (fp16: 65504) times the scalars applied after it. A per-head scale that
    is data, or any term adding to the visible scores, leaves them unbounded."""
    if m.head_scale is not None:
        return None
    if m.softcap:
        return float(m.softcap), f"the softcap bounds every score by {m.softcap:g}"
    dtype = value_of(m.q_operand.node).dtype
    largest = torch.finfo(dtype).max if dtype.is_floating_point else None
    if largest is None or largest > 1e30:
        return None
    bound = largest * abs(m.score_scale)
    return bound, f"Q·Kᵀ is computed in {str(dtype).replace('torch.', '')} (|q·k| <= {largest:g}), times {m.score_scale:g}"


def _finite_fill_problem(m: AttentionMatch, finite: list[ScoreTerm], classified: MaskInfo | None) -> str:
    """Why the finite fills of `finite` cannot be proven equivalent to -inf masking, or "".

    Equivalent iff in every row (1) some key stays visible, and (2) exp(fill - max visible score) underflows
    to 0 in fp32, i.e. max visible score > fill + 104. (1) holds for a mask proven causal / a band whose
    diagonal key is visible, or none (shape-only or from a guarded buffer); never for padding or other data.
    (2) needs a lower bound on the scores: `visible_score_bound`; a finite visible score is assumed (an
    overflowing product makes eager's own result meaningless)."""
    worst = max(t.value for t in finite)
    what = f"a mask fills scores with {worst}, which does not mask them out as -inf does (its value in the scores' dtype)"
    if classified is None:
        return f"{what}, and the {len(m.terms)} mask terms are not one proven mask"
    pure = classified.kind in ("none", "causal", "band") and not classified.data_dependent
    diagonal = not classified.bottom_right or bool(m.q_len <= m.k_len)
    if not (pure and diagonal):
        return (f"{what}, and the mask ({classified.kind}) can leave a row with no visible key, whose "
                f"softmax then averages the filled keys")
    bound = visible_score_bound(m)
    if bound is None:
        return (f"{what}: every row keeps a visible key, but nothing bounds the scores (data), so a row whose "
                f"scores all sit within {EXP_UNDERFLOW:g} of {worst:g} would still weigh the filled keys")
    limit, why = bound
    if not worst < -(limit + EXP_UNDERFLOW):
        return (f"{what}: every row keeps a visible key and {why}, so scores may reach -{limit:g}, within "
                f"{EXP_UNDERFLOW:g} of the fill")
    return ""


def _fill_mode_value(terms: list[ScoreTerm], finite: list[ScoreTerm], problem: str) -> float:
    """The one value the op's fill mode gives every masked score, or raise Refused saying why the site's terms
    are not one fill (`problem`: why the fill is not -inf masking).

    The op replaces every score its mask hides (a False keep-mask entry, causal, window) by `fill`, after the
    scores and any float bias. That is the source's computation when every term is a fill / keep of that one
    value: their conjunction hides the union of what each hides, and all of it takes the value, in any order.
    A -inf mask or an additive term beside it would need a second bias (and an order) the op does not take."""
    values = sorted({t.value for t in finite})
    if len(values) > 1:
        raise Refused(f"{problem}; and the site fills with {len(values)} different finite values "
                      f"({' and '.join(f'{v:g}' for v in values)}): the op's fill mode takes one")
    others = [t for t in terms if t not in finite]
    if others:
        t = others[0]
        what = ("a -inf mask" if t.kind in ("fill", "keep") else
                "an additive bias" if t.kind == "bias" else f"a {t.kind} term")
        raise Refused(f"{problem}; and {what} (`{t.node.name}`) is applied with the finite fill {values[0]:g}: "
                      f"the op's fill mode takes one keep-mask whose hidden keys all take the fill")
    return values[0]


def _finite_fill_note(m: AttentionMatch, finite: list[ScoreTerm]) -> str:
    limit, why = visible_score_bound(m)
    worst = max(t.value for t in finite)
    return (f"; the fill {worst:g} is -inf masking: every row keeps a visible key, and {why}, so a filled key "
            f"weighs exp({worst:g} + {limit:g}) = 0 in fp32")


def _lift_note(terms: list[ScoreTerm], m: AttentionMatch) -> str:
    """What lifting the bias terms to the problem's [B, Hq, Tq, Tk] costs, when it is not a view."""
    notes, shapes = [], []
    for t in terms:
        shape = term_shape(t)
        shape = shape[max(len(shape) - len(t.score_shape), 0):]
        plan = lift_to_problem(shape, t.score_shape, problem_shape(m))
        if plan is None:
            shapes.append([1] * (4 - len(shape)) + shape[-4:])
            continue
        aligned, expand_to, reshape_to = plan
        shapes.append(reshape_to)
        if any(not sizes_equal(a, b) for a, b in zip(aligned, expand_to)):
            notes.append(f"`{t.node.name}` {shape}, added under the {list(t.score_shape)} view of the scores, "
                         f"is materialized as a {reshape_to} bias (its own size, not the scores')")
    if len(terms) > 1:
        total = [next((d for d in dims if not sizes_equal(d, 1)), 1) for dims in zip(*shapes)]
        notes.append(f"the {len(terms)} terms are summed into one {total} bias (the op takes one bias)")
    return "; " + "; ".join(notes) if notes else ""


def lift_problem(term: ScoreTerm, m: AttentionMatch) -> str:
    """Why `term` cannot be given to the op as a bias broadcastable to [B, Hq, Tq, Tk], or "".

    A term broadcasts against the scores where it is applied (`term.score_shape`), any regrouping of the
    problem's [B, Hq, Tq, Tk] scores (`[B*H, Tq, Tk]`, Swin's `[B, nW, H, N, N]`): `layout.lift_to_problem`
    says how it becomes a bias of the problem (the rewrite follows the same plan).
    """
    shape = term_shape(term)
    score_shape = list(term.score_shape)
    extra = len(shape) - len(score_shape)
    if extra > 0 and any(not bool(s == 1) for s in shape[:extra]):
        return f"a mask/bias of shape {shape} has more dims than the scores {score_shape} it is applied to"
    problem = problem_shape(m)
    try:
        plan = lift_to_problem(shape, score_shape, problem)
    except NotAView as e:
        return (f"a mask/bias of shape {shape} is applied to scores of shape {score_shape}, which are not a "
                f"regrouping of the attention's [B={m.batch}, H={m.q_heads}, Tq, Tk] ({e})")
    if plan is not None:
        _, expand_to, reshape_to = plan
        if sum(not isinstance(x, int) for x in reshape_to) > 1 and size_sources(
                reshape_to, m.output, set(m.region)) is None:
            return (f"a mask/bias of shape {shape} on scores of shape {score_shape} would be reshaped to "
                    f"{reshape_to}, whose symbolic sizes no tensor outside the attention holds")
        changed = [x for x, have in zip(expand_to, [1] * (len(expand_to) - len(shape)) + shape[max(extra, 0):])
                   if not sizes_equal(x, have)]
        if any(not isinstance(x, int) for x in changed) and size_sources(changed, m.output, set(m.region)) is None:
            return (f"a mask/bias of shape {shape} would be expanded to {expand_to}, whose symbolic sizes no "
                    "tensor outside the attention holds")
    return ""


def term_shape(term: ScoreTerm) -> list:
    """The term's shape as it broadcasts against its scores (a decode einsum's term gets its row dim)."""
    shape = list(shape_of(term.node))
    if term.row_inserted and shape:
        shape = shape[:-1] + [1] + shape[-1:]
    return shape


def _split_note(m: AttentionMatch) -> str:
    """What reading a split head dim (`Q·Kᵀ + Q2·K2ᵀ`) as one product costs."""
    if m.split is None:
        return ""

    q2, k2 = m.split
    parts = f"Q·Kᵀ + Q2·K2ᵀ is one product over head dims {m.head_dim} = q/k parts side by side"
    if adjacent_key_parts(m) is not None:
        return f"; {parts}: K read as one view of {m.k.source.args[0].name}, q concatenated per call"
    return (f"; {parts}: q and K concatenated per call (K from {m.k.source.name} and {k2.source.name}: keep "
            f"latent and rotary key in one buffer to avoid the copy)")


def _head_scale_note(m: AttentionMatch) -> str:
    if m.head_scale is None:
        return ""
    hs = m.head_scale
    return (f"; per-head scale {hs.node.name} {list(shape_of(hs.node))} folded into q "
            f"(q {'/' if hs.divide else '*'} {hs.node.name}), the op's scale {m.scale:g} is the static part")


def _why(spec: AttentionSpec, mask: MaskInfo) -> str:
    if spec.op == "sliding_window_attention":
        return f"causal band of {spec.window} keys: visits only in-window key blocks ({mask.reason})"
    if spec.causal:
        return f"causal ({'bottom-right' if spec.bottom_right else 'top-left'}), blocks above the diagonal skipped ({mask.reason})"
    if spec.bias_kind != "none":
        return f"{mask.kind} mask passed as a {spec.bias_kind} bias tensor ({mask.reason})"
    return "dense attention, no mask"
