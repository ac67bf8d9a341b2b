"""Outsider tests whose feature is specified but not built yet: each marked xfail(strict=True) by
tests/conftest.py with the reason here. Strict: the day the gap closes the test passes, the run fails, and
the entry must go. One place lists what the suite knows is missing; the issues say who builds it.

Keys are test node ids (file::test[params]) relative to the repository root; a key without parameters
covers every parametrization of the test.
"""

NEEDS_FILL_MODE = ("issue 22 class 2: a finite fill that is not provably -inf masking needs the op's fill "
                   "mode (masked scores take the fill: a fully masked row is a uniform average); refused today")
DATA_ALIAS_BLIND_SPOT = ("issue 22 class 1: a buffer written through .data (or a NumPy / DLPack alias) "
                         "changes neither its _version nor its identity, so the backend's guard does not see "
                         "it; closing it needs the op's device-side `verified` input (docs/design/issue22.md)")

# issue 21: the pass side is built (detect21); these wait on the op side (branch opsfeat, docs/design/issue21.md)
OP_VALUE_HEAD_DIM = ("issue 21.1, op side: the Triton kernels (flash forward / backward, sliding, paged MLA decode "
                     "576 / 512) take no value head dim of their own yet; the CPU reference does, and the pass side "
                     "fuses Dv != Dqk sites (refused by the op's own check where its kernels run)")
OP_SINKS = ("issue 21.2, op side: the ops take no `sinks` argument yet (schema, reference, kernels, dsinks); the "
            "pass side finds the sink spellings and refuses them for that reason (passes/analyze.op_takes), hf.py "
            "refuses s_aux until then")
OP_DOCUMENTS = ("issue 21.3, op side: the ops take no `doc_ids` argument and attnlower.ops has no "
                "doc_ids_from_position_ids / doc_ids_from_cu_seqlens yet; the pass side proves document masks and "
                "passes them as a dense bias until then (the report says so), hf.py keeps the sdpa mask")
KNOWN_GAPS = {
    # ---- issue 21, waiting on the op side
    "tests/lowering/test_features_issue21.py::test_flash_value_head_dim_differs[kernel-plain-qk24-v16]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_flash_value_head_dim_differs[kernel-plain-qk20-v40]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_flash_value_head_dim_differs[kernel-plain-qk40-v24]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_flash_value_head_dim_differs[kernel-causal_gqa-qk24-v16]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_flash_value_head_dim_differs[kernel-causal_gqa-qk20-v40]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_flash_value_head_dim_differs[kernel-causal_gqa-qk40-v24]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_flash_value_head_dim_differs[kernel-bottom_right_bias-qk24-v16]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_flash_value_head_dim_differs[kernel-bottom_right_bias-qk20-v40]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_flash_value_head_dim_differs[kernel-bottom_right_bias-qk40-v24]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_sliding_value_head_dim_differs[kernel]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_paged_mla_absorbed_decode[kernel-deepseek_576_512-decode]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_paged_mla_absorbed_decode[kernel-deepseek_576_512-chunked_prefill]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_paged_mla_absorbed_decode[kernel-odd_26_20-decode]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_paged_mla_absorbed_decode[kernel-odd_26_20-chunked_prefill]":
        OP_VALUE_HEAD_DIM,
    "tests/lowering/test_features_issue21.py::test_flash_sinks":
        OP_SINKS,
    "tests/lowering/test_features_issue21.py::test_sinks_lse_includes_the_sink":
        OP_SINKS,
    "tests/lowering/test_features_issue21.py::test_sinks_rows_without_keys":
        OP_SINKS,
    "tests/lowering/test_features_issue21.py::test_sliding_sinks":
        OP_SINKS,
    "tests/lowering/test_features_issue21.py::test_paged_sinks":
        OP_SINKS,
    "tests/lowering/test_features_issue21.py::test_sinks_bf16_parameter":
        OP_SINKS,
    "tests/lowering/test_features_issue21.py::test_sinks_validation":
        OP_SINKS,
    "tests/lowering/test_features_issue21.py::test_opcheck_sinks":
        OP_SINKS,
    "tests/lowering/test_features_issue21.py::test_flash_documents":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_documents_int64_and_broadcast_batch":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_documents_unsorted_ids_stay_exact":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_documents_bottom_right":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_sliding_documents":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_documents_with_padding_bias_and_sinks":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_kernels_skip_blocks_of_other_documents":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_doc_ids_validation":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_opcheck_documents":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_doc_ids_from_position_ids_matches_hf":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_doc_ids_from_cu_seqlens":
        OP_DOCUMENTS,
    "tests/lowering/test_features_issue21.py::test_doc_id_helpers_and_op_are_graph_safe":
        OP_DOCUMENTS,
    "tests/test_modern_attention_sinks.py::test_hf_style_sinks[eager-full]": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_hf_style_sinks[eager-window5]": OP_SINKS,
    # (on opsfeat d2d9266..ed54128 these two still fail: Inductor's call of flash_attention_backward passes
    # sinks_requires_grad where the schema has doc_ids)
    "tests/test_modern_attention_sinks.py::test_hf_style_sinks[inductor-full]": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_hf_style_sinks[inductor-window5]": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_openai_reference_sinks": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_lse_form_sinks": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_rescale_form_sinks": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_hf_gpt_oss": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_hf_gpt_oss_backward": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_hf_gpt_oss_padded": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_attn_implementation_attnlower_s_aux": OP_SINKS,
    "tests/test_modern_attention_sinks.py::test_paged_cache_generate_with_sinks": OP_SINKS,
    "tests/test_modern_attention_packed.py::test_flex_document_mask": OP_DOCUMENTS,
    "tests/test_modern_attention_packed.py::test_restarting_positions": OP_DOCUMENTS,
    "tests/test_modern_attention_packed.py::test_cu_seqlens_offsets": OP_DOCUMENTS,
    "tests/test_modern_attention_packed.py::test_packed_encoder": OP_DOCUMENTS,
    "tests/test_modern_attention_packed.py::test_packed_sliding_window": OP_DOCUMENTS,
    "tests/test_modern_attention_packed.py::test_packed_lengths_vary_without_recompiling": OP_DOCUMENTS,
    "tests/test_modern_attention_packed.py::test_hf_packed": OP_DOCUMENTS,
    "tests/test_modern_attention_packed.py::test_hf_packed_backward": OP_DOCUMENTS,
    "tests/test_modern_attention_packed.py::test_attn_implementation_attnlower_packed": OP_DOCUMENTS,
    # ---- earlier issues
    "tests/passes/test_spelling_class_buffer_masks.py::test_nanogpt_buffer_written_through_data_after_compiling":
        DATA_ALIAS_BLIND_SPOT,
    "tests/passes/test_spelling_class_finite_fills.py::test_annotated_decoder_causal_and_padding": NEEDS_FILL_MODE,
    "tests/passes/test_spelling_class_finite_fills.py::test_annotated_decoder_gradients": NEEDS_FILL_MODE,
    "tests/passes/test_spelling_class_finite_fills.py::test_annotated_encoder_fully_padded_sequence": NEEDS_FILL_MODE,
    "tests/passes/test_spelling_class_finite_fills.py::test_annotated_subsequent_mask_is_causal": NEEDS_FILL_MODE,
    "tests/passes/test_spelling_class_finite_fills.py::test_annotated_fill_in_bf16": NEEDS_FILL_MODE,
    "tests/passes/test_spelling_class_finite_fills.py::test_gpt2_v4_masked_bias_buffer": NEEDS_FILL_MODE,
    "tests/passes/test_spelling_class_finite_fills.py::test_fill_near_the_scores_is_not_minus_inf": NEEDS_FILL_MODE,
    "tests/passes/test_spelling_class_finite_fills.py::test_distilbert_finfo_min_fill[fp16]": NEEDS_FILL_MODE,
}
