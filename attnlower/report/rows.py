"""A site's row in the report, read from the record the pass stages filled in."""
from __future__ import annotations

from ..passes.site import AttentionSite
from ..target import kernel_plan
from .costs import memory_estimate
from .records import Site, format_dims


def site_rows(sites: list[AttentionSite], target, kernel_plans: bool = False, traced: bool = False) -> list[Site]:
    """The report's rows of `sites`, in order; `kernel_plans` adds each rewritten site's launch plan
    (what the dump shows; it imports the lowering's planner, so only when asked); `traced`: Inductor launches
    the ops' kernels itself (target.inductor_launches_kernels), so the plans name the kernels it launches."""
    rows = [site_row(s) for s in sites]
    if kernel_plans:
        for site, row in zip(sites, rows):
            if site.rewritten:
                row.kernel = kernel_plan(site.decision.spec, target, site.match.q_len, site.match.k_len,
                                         traced=traced)
    return rows


def site_row(site: AttentionSite) -> Site:
    """What the report says of one site: where, its shapes, the mask as proven, the op or why none."""
    m = site.match
    row = Site(index=site.index, location=site.location, spelling=m.spelling if m is not None else site.spelling)
    if m is None:
        row.region = [site.anchor.name]
    else:
        row.region = [n.name for n in m.region]
        # logical [B, H, T, D] whatever the source layout (BSHD, flattened B*H, repeated KV heads)
        row.shapes = {
            "q": format_dims((m.batch, m.q_heads, m.q_len, m.head_dim)),
            "k": format_dims((m.batch, m.kv_heads, m.k_len, m.head_dim)),
            "v": format_dims((m.batch, m.kv_heads, m.k_len, m.v_head_dim)),
        }
        row.memory = memory_estimate(m)
    row.mask = mask_kind(site)
    if site.rewritten:
        row.op = site.decision.spec.op
        row.spec = site.decision.spec.as_dict()
        row.nodes = list(site.replaced)
        row.reason = site.decision.reason
    else:
        row.reason = site.refusal or ""
    row.validated = site.validated
    row.validation_repro = site.validation_repro
    return row


def mask_kind(site: AttentionSite) -> str:
    """The mask column: what the site's mask was proven to be, also when the site was refused after (or before)
    the proof. "none" only when the site has no mask term; a term the stages did not classify says so."""
    if site.decision is not None:
        return site.decision.mask.kind
    if site.mask is not None:
        return site.mask.kind
    chain = site.match or site.chain
    if chain is None:
        return "unknown (not read)"   # refused before its score chain was read
    if not chain.terms:
        return "none"
    if len(chain.terms) > 1:
        return f"{len(chain.terms)} terms, unclassified"
    return f"{chain.terms[0].kind} term, unclassified"
