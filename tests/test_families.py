"""Every supported MoE family, built tiny from its config class: exact routing, exact subset scores,
prune -> export -> reload in stock transformers, and skipping."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_sparsify.adapters import adapter_for
from moe_sparsify.errors import UsageError
from moe_sparsify.models import auto_model_class
from moe_sparsify.objective import SubsetLoss
from moe_sparsify.prune import layer_stats
from moe_sparsify.search import KeepSpace
from moe_sparsify.skipping import disable_skipping, enable_skipping
from moe_sparsify.thresholds import LayerThreshold, SkipThresholds, model_fingerprint, profile

from .conftest import save_with_tokenizer

COMMON = dict(
    num_hidden_layers=3,
    hidden_size=32,
    vocab_size=2048,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
)
DEEPSEEK = dict(
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
)
DSV3_LIKE = dict(
    intermediate_size=48, moe_intermediate_size=16, num_experts_per_tok=2, head_dim=8, routed_scaling_factor=1.5
)
# DeepSeek-V3 routers inside other attention stacks (MLA, sparse-attention indexers, linear attention).
MLA = dict(
    num_attention_heads=2,
    intermediate_size=64,
    moe_intermediate_size=16,
    max_position_embeddings=256,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)
DSA = dict(index_n_heads=2, index_head_dim=16, index_topk=8)
GROUPED_V3 = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1)
FAMILIES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        mlp_only_layers=[0],
        norm_topk_prob=True,
    ),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(DEEPSEEK, q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.5),
    "deepseek_v3": dict(DEEPSEEK, q_lora_rank=16, n_group=2, topk_group=2, routed_scaling_factor=2.5),
    # Group-limited routing: 2 groups of 4, one chosen per token; keep 6 removes one expert from each.
    "deepseek_v2:grouped": dict(
        DEEPSEEK,
        q_lora_rank=None,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
    ),
    "deepseek_v3:grouped": dict(DEEPSEEK, q_lora_rank=16, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "dots1": dict(DEEPSEEK, q_lora_rank=None, n_group=1, topk_group=1, routed_scaling_factor=2.0, norm_topk_prob=True),
    "glm4_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        head_dim=8,
    ),
    "minimax": dict(
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["full_attention", "linear_attention", "full_attention"],
    ),
    "granitemoe": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, logits_scaling=2.0),
    "granitemoeshared": dict(
        intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=24
    ),
    "granitemoe_swa": dict(
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
    ),
    "mellum": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["full_attention"] * 3,
        mlp_layer_types=["dense", "sparse", "sparse"],
    ),
    "qwen3_next": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        norm_topk_prob=True,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    ),
    "lara_mini": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    ),
    "flint": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        mlp_only_layers=[0],
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    ),
    "exaone_moe": dict(
        DSV3_LIKE,
        num_experts=8,
        num_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"],
    ),
    "solar_open": dict(DSV3_LIKE, n_routed_experts=8, n_shared_experts=1, n_group=1, topk_group=1),
    "mimo_v2_flash": dict(
        DSV3_LIKE,
        n_routed_experts=8,
        n_group=1,
        topk_group=1,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"],
    ),
    "minimax_m2": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "hy_v3": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        head_dim=8,
        router_scaling_factor=2.5,
        mlp_layer_types=["dense", "sparse", "sparse"],
    ),
    "hunyuan_v1_moe": dict(intermediate_size=16, num_experts=8, moe_topk=2, head_dim=8),
    "ernie4_5_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
    ),
    "cohere2_moe": dict(
        intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        shared_expert_combination_strategy="average",
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["sparse"] * 3,
    ),
    "cohere2_moe:sigmoid": dict(
        intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        expert_selection_fn="sigmoid",
        norm_topk_prob=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["sparse"] * 3,
    ),
    "granitemoehybrid": dict(
        intermediate_size=16,
        shared_intermediate_size=32,
        layer_types=["mamba", "attention", "mamba"],
        mamba_n_heads=4,
        mamba_d_state=16,
        mamba_chunk_size=16,
        position_embedding_type="rope",
        num_local_experts=8,
        num_experts_per_tok=2,
        logits_scaling=4.0,
    ),
    "qwen3_5_moe_text": dict(
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen4_exp_text": dict(
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "indexed_attention", "linear_attention"],
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        hc_count=2,
        hc_lowrank=8,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=8,
        indexer_budget=8,
        indexer_compress_ratio=4,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "jamba": dict(
        intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        expert_layer_period=1,
        expert_layer_offset=0,
        attn_layer_period=3,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=4,
    ),
    "afmoe": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        num_dense_layers=1,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        route_scale=2.5,
    ),
    "aria_text": dict(intermediate_size=16, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1),
    "laguna": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_routed_scaling_factor=2.5,
        moe_router_logit_softcapping=3.0,  # low enough to bend the tiny model's logits
    ),
    "lfm2_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        num_dense_layers=1,
        layer_types=["conv", "full_attention", "conv"],
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    "minimax_m3_vl_text": dict(
        intermediate_size=16,
        dense_intermediate_size=64,
        shared_intermediate_size=16,
        mlp_layer_types=["dense", "sparse", "sparse"],
        head_dim=8,
        rotary_dim=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "deepseek_v32": dict(MLA, **DSA, **GROUPED_V3, first_k_dense_replace=1),
    "glm4_moe_lite": dict(MLA, **GROUPED_V3),
    "sarvam_mla": dict(MLA, **GROUPED_V3, first_k_dense_replace=1),
    "axk2": dict(
        MLA,
        **DSA,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        gated_norm_rank=4,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "hy_v4": dict(MLA, **DSA, **GROUPED_V3, hc_mult=2, pad_token_id=0, bos_token_id=0, eos_token_id=1),
    # Layer 2 reuses layer 1's indexer top-k, handed over as prev_topk_indices.
    "glm_moe_dsa": dict(MLA, **DSA, **GROUPED_V3, first_k_dense_replace=1, indexer_types=["full", "full", "shared"]),
    "dots3_note_text": dict(
        MLA,
        **DSA,
        **GROUPED_V3,
        shared_experts_intermediate_size=16,
        head_dim=16,
        use_sliding_window=False,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "kimi_linear": dict(
        MLA,
        num_experts=8,
        num_experts_per_token=2,
        num_expert_group=2,
        topk_group=1,
        num_shared_experts=1,
        linear_attn_config={
            "head_dim": 16,
            "num_heads": 2,
            "short_conv_kernel_size": 4,
            "full_attn_layers": [2],
            "kda_layers": [1, 3],
        },
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "sarvam_moe": dict(
        num_attention_heads=2,
        intermediate_size=64,
        moe_intermediate_size=16,
        head_dim=16,
        first_k_dense_replace=1,
        **GROUPED_V3,
    ),
    "bailing_hybrid": dict(
        MLA,
        num_experts=8,
        num_experts_per_token=2,
        num_expert_group=2,
        topk_group=1,
        num_shared_experts=1,
        first_k_dense_replace=1,
        layer_group_size=3,
        head_dim=16,
        num_mtp_layers=0,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "nemotron_h": dict(
        num_attention_heads=2,
        head_dim=16,
        intermediate_size=64,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=16,
        moe_latent_size=24,
        mlp_bias=True,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=8,
        n_groups=2,
        chunk_size=8,
        use_mamba_kernels=False,
        layers_block_type=["attention", "moe", "moe"],
    ),
    "beam": dict(
        num_attention_heads=2,
        head_dim=16,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        sliding_window=8,
        mlp_layer_types=["dense", "sparse", "sparse"],
        final_logit_softcapping=3.0,  # low enough to bend the tiny model's logits
    ),
    "llama4_text": dict(
        intermediate_size=16,
        intermediate_size_mlp=64,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        interleave_moe_layer_step=1,
    ),
    "dbrx": dict(
        d_model=32,
        n_layers=3,
        n_heads=4,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2),
    ),
    "kolibri1": dict(
        num_attention_heads=2,
        head_dim=16,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
    ),
    "glm4v_moe_text": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        head_dim=8,
        **GROUPED_V3,
        first_k_dense_replace=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 0, 1]},
    ),
    "mistral4": dict(MLA, **GROUPED_V3, first_k_dense_replace=1, routed_scaling_factor=2.0),
    "qwen3_vl_moe_text": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    ),
    "flex_olmo": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1),
    # A wider jitter band than Phi-3.5-MoE's 0.01, so weights depend on more than the selected pair.
    "phimoe": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.1),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16),
}


# Language models that exist only inside a vision-language wrapper: (wrapper type, tiny vision config).
VISION_WRAPPERS = {
    "glm4v_moe_text": (
        "glm4v_moe",
        dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32, image_size=28),
    ),
    "qwen3_vl_moe_text": (
        "qwen3_vl_moe",
        dict(
            depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32, deepstack_visual_indexes=[0]
        ),
    ),
}


def build(family: str, **overrides):
    torch.manual_seed(0)
    model_type = family.split(":")[0]  # "type:variant" keys test other settings of one family
    settings = {**COMMON, **FAMILIES[family], **overrides}
    if model_type in VISION_WRAPPERS:
        wrapper, vision = VISION_WRAPPERS[model_type]
        config = AutoConfig.for_model(wrapper, text_config=settings, vision_config=vision)
    else:
        config = AutoConfig.for_model(model_type, **settings)
    model = auto_model_class(config).from_config(config).eval()
    adapter = adapter_for(model.config)
    for index in adapter.moe_layers(model):  # a selection bias that matters, where the family has one
        bias = adapter.selection_bias(adapter.moe_block(adapter.decoder_layers(model)[index]))
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(index)) * 0.2)
    return model, adapter


def _mask(subset, n=8):
    keep = torch.zeros(n, dtype=torch.bool)
    keep[list(subset)] = True
    return keep


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_routed_forward_is_the_stock_block_and_scores_are_exact(family):
    model, adapter = build(family)
    layers = adapter.moe_layers(model)
    assert layers and len(layers) <= 3
    x = torch.randn(2, 40, adapter.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for index in layers:
            block = adapter.moe_block(adapter.decoder_layers(model)[index])
            stock = _block_output(block(x)).reshape(x.shape)  # Llama 4 returns (tokens, hidden)
            assert (_block_output(adapter.routed_forward(block, x, None)) - stock).abs().max() <= 1e-5
        block = adapter.moe_block(adapter.decoder_layers(model)[layers[-1]])
        flat = x.reshape(-1, x.shape[-1])
        oracle = SubsetLoss(layer_stats(adapter, block, [flat], 6))
        subsets = KeepSpace(8, 6, oracle.groups).subsets()  # an equal share per group where routing is grouped
        fast = oracle(torch.stack([_mask(s) for s in subsets]))
        full = _block_output(adapter.routed_forward(block, flat, None))
        brute = torch.tensor(
            [
                ((_block_output(adapter.routed_forward(block, flat, _mask(s))) - full).double() ** 2).sum().item()
                / len(flat)
                for s in subsets
            ],
            dtype=torch.float64,
        )
    assert torch.allclose(fast, brute, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_calibrate_prune_export_reload_and_skip(family, tmp_path, small_calibration):
    from typer.testing import CliRunner

    from moe_sparsify.cli import app

    model, adapter = build(family)
    source = save_with_tokenizer(model, tmp_path / "source")
    out, calib = tmp_path / "pruned", tmp_path / "calib"
    calibrated = CliRunner().invoke(
        app,
        ["calibrate", "--model", str(source), "--output", str(calib), "--samples", "8", "--seq-len", "32"]
        + list(map(str, small_calibration)),
    )
    assert calibrated.exit_code == 0, calibrated.stderr
    result = CliRunner().invoke(
        app,
        ["prune", "--model", str(source), "--keep", "6", "--from-calibration", str(calib), "-o", str(out), "--json"],
    )
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [lp["layer"] for lp in plan["layers"]] == adapter.moe_layers(model)
    reloaded = auto_model_class(model.config).from_pretrained(out).eval()
    reloaded_adapter = adapter_for(reloaded.config)
    assert reloaded_adapter.num_experts == 6
    ids = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(3))
    kept = {lp["layer"]: lp["kept"] for lp in plan["layers"]}
    with torch.no_grad(), adapter.pruned_view(model, kept):
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-4

    if not reloaded_adapter.supports_skipping:
        with pytest.raises(UsageError, match="skipping is not available"):
            enable_skipping(reloaded, SkipThresholds(model_fingerprint(reloaded, reloaded_adapter), "tail", {}, []))
        return
    # Skipping on the pruned model: thresholds 0 are the stock model; tail thresholds run.
    weights = {i: torch.rand(64, 2).sort(descending=True).values for i in reloaded_adapter.moe_layers(reloaded)}
    rule, layers = profile(weights, "tail", {"kind": "quantile", "value": 0.5}, reloaded_adapter.top_k)
    fingerprint = model_fingerprint(reloaded, reloaded_adapter)
    zero = SkipThresholds(fingerprint, rule, {}, [LayerThreshold(e.layer, 0.0, 0.0) for e in layers])
    with torch.no_grad():
        enable_skipping(reloaded, zero)
        try:
            assert (reloaded(input_ids=ids).logits - got).abs().max() <= 1e-5
        finally:
            disable_skipping(reloaded)
        enable_skipping(reloaded, SkipThresholds(fingerprint, rule, {}, layers))
        try:
            skipping_logits = reloaded(input_ids=ids).logits
            first = layers[0]
            block = reloaded_adapter.moe_block(reloaded_adapter.decoder_layers(reloaded)[first.layer])
            x = torch.randn(1, 30, reloaded_adapter.config.hidden_size, generator=torch.Generator().manual_seed(4))
            skipped = _block_output(block(x))
        finally:
            disable_skipping(reloaded)
        reference = _block_output(reloaded_adapter.routed_forward(block, x, None, (first.beta, rule)))
        with reloaded_adapter.pruned_view(reloaded, {}, {e.layer: (e.beta, rule) for e in layers}):
            reference_logits = reloaded(input_ids=ids).logits  # the whole model through the reference router
    assert (skipped - reference).abs().max() <= 1e-5
    assert (skipping_logits - reference_logits).abs().max() <= 1e-4


def test_axk2_with_groups_is_refused():
    config = AutoConfig.for_model("axk2", **{**COMMON, **FAMILIES["axk2"], "n_group": 2, "topk_group": 1})
    with pytest.raises(UsageError, match="fills excluded groups with 0.0"):
        adapter_for(config)


def test_group_limited_keep_must_split_equally_and_the_groups_stay(tmp_path):
    from typer.testing import CliRunner

    from moe_sparsify.cli import app

    model, adapter = build("deepseek_v3:grouped")
    assert adapter.routing.grouped and adapter.routing_groups == 2
    source = save_with_tokenizer(model, tmp_path / "source")
    result = CliRunner().invoke(app, ["prune", "--model", str(source), "--keep", "5", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "choose a multiple of 2 from 4 to 8" in result.stderr
    assert not (tmp_path / "o").exists()
    config = model.config.to_dict()
    assert adapter.pruned_config(config, 6) == ["n_routed_experts: 8 -> 6"]
    assert (config["n_group"], config["topk_group"]) == (2, 1)


def test_group_limited_search_keeps_an_equal_share_per_group():
    model, adapter = build("deepseek_v2:grouped")
    block = adapter.moe_block(model.model.layers[1])
    x = torch.randn(300, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        oracle = SubsetLoss(layer_stats(adapter, block, [x], 4))
    from moe_sparsify.search import SearchContext, run_strategy

    best = run_strategy("exhaustive", oracle, 4, SearchContext(layer=1))
    assert best.subsets_scored == 36  # C(4, 2)^2, not C(8, 4)
    for name in ("exhaustive", "greedy", "frequency", "reap", "random"):
        kept = run_strategy(name, oracle, 4, SearchContext(layer=1, beam=2)).kept
        assert sum(e < 4 for e in kept) == 2, name
    assert run_strategy("greedy", oracle, 4, SearchContext(layer=1)).loss >= best.loss - 1e-12


def test_many_experts_take_greedy_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from moe_sparsify.cli import app

    model, adapter = build("olmoe", num_experts=16, num_experts_per_tok=4)
    source = save_with_tokenizer(model, tmp_path / "source")
    args = ["prune", "--model", str(source), "--keep", "8", "--max-subsets", "1000", "--output", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--samples", "8", "--seq-len", "32", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["strategy"] == "greedy"  # C(16, 8) = 12870 subsets > 1000
    assert all(len(lp["kept"]) == 8 for lp in data["layers"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.num_experts == 8


def test_config_keys_written_for_old_and_new_loaders():
    model, adapter = build("qwen3_moe")
    config = model.config.to_dict()
    changes = adapter.pruned_config(config, 6)
    assert config["num_experts"] == config["num_local_experts"] == 6
    assert "num_experts: 8 -> 6" in changes


def test_group_limited_many_experts_take_greedy_and_export_exactly(tmp_path):
    """DeepSeek-V3's shape in small: 64 experts in 8 groups, 3 chosen, top-6; keep 40 = 5 per group."""
    from typer.testing import CliRunner

    from moe_sparsify.cli import app

    model, _ = build(
        "deepseek_v3:grouped",
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=3,
        moe_intermediate_size=8,
    )
    source = save_with_tokenizer(model, tmp_path / "source")
    args = ["prune", "--model", str(source), "--keep", "40", "-o", str(tmp_path / "out"), "--json"]
    result = CliRunner().invoke(app, [*args, "--samples", "16", "--seq-len", "64"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["strategy"] == "greedy"
    assert data["verified_max_abs_logit_diff"] <= 1e-4
    for lp in data["layers"]:
        assert [sum(e // 8 == g for e in lp["kept"]) for g in range(8)] == [5] * 8
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "out").config
    assert (config.n_routed_experts, config.n_group, config.topk_group) == (40, 8, 3)


def test_every_supported_type_is_tested_here_and_listed_in_the_readme():
    from pathlib import Path

    from moe_sparsify.adapters import supported_model_types

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    tested = {family.split(":")[0] for family in FAMILIES}
    for model_type in supported_model_types():
        assert model_type in tested, f"{model_type} has no tiny config in FAMILIES"
        assert f"`{model_type}`" in readme, f"{model_type} is missing from the README support table"


MULTIMODAL = {
    "minimax_m3_vl": (
        "minimax_m3_vl_text",
        "num_local_experts",
        dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32),
    ),
    "qwen3_5_moe": (
        "qwen3_5_moe_text",
        "num_experts",
        dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32),
    ),
    "llama4": (
        "llama4_text",
        "num_local_experts",
        dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
            image_size=28,
            patch_size=14,
        ),
    ),
}


@pytest.mark.parametrize("model_type", sorted(MULTIMODAL))
def test_multimodal_checkpoint_prunes_its_language_model(model_type, tmp_path):
    """A vision-language checkpoint (text config nested, a vision tower beside the language model),
    saved as the hub has it: AutoModelForCausalLM loads the language model, which is pruned; the
    vision tower and the nesting survive the export."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText
    from typer.testing import CliRunner

    from moe_sparsify.cli import app

    text_family, count_key, vision = MULTIMODAL[model_type]
    text = dict(COMMON, **FAMILIES[text_family])
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision)
    source = save_with_tokenizer(AutoModelForImageTextToText.from_config(config).eval(), tmp_path / "source")
    loader = auto_model_class(config)  # AutoModelForCausalLM where it loads the language model alone
    runner = CliRunner()
    common = ["prune", "--model", str(source), "--keep", "6", "--samples", "8", "--seq-len", "32"]
    streamed = runner.invoke(app, [*common, "--stream", "-o", str(tmp_path / "s")])
    assert streamed.exit_code == 2 and "run without --stream" in streamed.stderr
    result = runner.invoke(app, [*common, "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["config_changes"] == [f"text_config.{count_key}: 8 -> 6"]
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["model_type"] == model_type and exported["text_config"][count_key] == 6
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        assert any("visual." in name or "vision" in name for name in handle.keys())
    original = loader.from_pretrained(source).eval()
    reloaded = loader.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(3))
    kept = {lp["layer"]: lp["kept"] for lp in data["layers"]}
    with torch.no_grad(), adapter_for(original.config).pruned_view(original, kept):
        expected = original(input_ids=ids).logits
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "family",
    [
        "deepseek_v2:grouped",
        "deepseek_v3:grouped",
        "ernie4_5_moe",
        "phimoe",
        "llama4_text",
        "dbrx",
        "nemotron_h",
        "kolibri1",
        "gpt_oss",
    ],
)
def test_each_routing_kind_prunes_in_bfloat16(family, tmp_path):
    """Calibration and search in bf16 (routers computed as each family computes them), export verified."""
    from typer.testing import CliRunner

    from moe_sparsify.cli import app

    model, _ = build(family)
    source = save_with_tokenizer(model, tmp_path / "source")
    args = ["prune", "--model", str(source), "--keep", "6", "-o", str(tmp_path / "out"), "--dtype", "bfloat16"]
    result = CliRunner().invoke(app, [*args, "--samples", "8", "--seq-len", "32", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified_max_abs_logit_diff"] <= 1e-4
