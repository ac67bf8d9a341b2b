"""The report in the user's words: reasons that name what the user wrote, said once, and why this op."""
from __future__ import annotations

import logging

from . import names
from .compiles import explain_kernels
from .costs import savings
from .records import CompileReport, Site


def describe_sites(report: CompileReport, graph, dynamo_graph=None, target=None, explain: bool = False) -> None:
    """Finish each site's text for people: reasons naming what the user wrote (names.humanize, on the
    aten graph the passes read), no clause said twice, why this op and not the others, what it saves.

    `graph` is the aten graph before the passes (the reasons name its nodes), `dynamo_graph` the
    graph Dynamo handed the backend (its placeholders carry the user's argument names).
    """
    try:
        arguments = names.argument_names(graph, dynamo_graph) if graph is not None else {}
        for s in report.sites:
            if graph is not None:
                s.reason = names.humanize(s.reason, graph, arguments)
            s.reason = names.dedupe(s.reason)
            s.choice = op_choice(s)
            s.saves = savings(s, target)
    except Exception as e:  # noqa: BLE001 - the report's wording must never fail a compile
        logging.getLogger("attnlower").warning(
            "attnlower: could not word the report of graph %d (%s: %s); its reasons stay as the passes wrote them",
            report.graph_id, type(e).__name__, e)
    if explain:
        explain_kernels(report, target)


def op_choice(site: Site) -> str:
    """Why this op and not the other two, from the site's spec: "flash; not sliding: no band ..."."""
    spec = site.spec
    if not site.rewritten or not spec:
        return ""
    not_paged = ("not paged: K/V are gathered from a block pool, but the paged op does not fit (see why)"
                 if "paged gather was seen" in site.reason else "not paged: K/V are not gathered from a block pool")
    if site.op == "paged_attention":
        return ("paged: K/V are gathered from a block pool, read in place; "
                "not flash / sliding: they would read the gathered copy")
    documents = "; documents: key blocks of other documents skipped" if spec.get("documents") else ""
    if site.op == "sliding_window_attention":
        return (f"sliding: only key blocks inside the {spec.get('window')}-key band are visited{documents}; "
                f"not flash: it would visit every key block left of the diagonal; {not_paged}")
    if spec.get("bias_kind", "none") != "none" and "document" in str(spec.get("mask_kind")):
        return (f"flash with the mask as a {spec.get('bias_kind')} bias: the {spec.get('mask_kind')} mask needs "
                f"the op's doc_ids to skip blocks, which it does not take yet; {not_paged}")
    if spec.get("bias_kind", "none") != "none":
        return (f"flash with the mask as a {spec.get('bias_kind')} bias; not sliding: no band proven from "
                f"shapes alone (the mask reads data or is not a band); {not_paged}")
    if spec.get("causal"):
        return f"flash{documents}; not sliding: causal without a band (sliding needs a window); {not_paged}"
    if documents:
        return f"flash{documents}; not sliding: no band (sliding needs a window); {not_paged}"
    return f"flash; not sliding: no mask, no band (sliding needs a window); {not_paged}"
