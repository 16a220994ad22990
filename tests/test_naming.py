"""Module paths: one rule for the layer and the projection type, on the names of real model
families (BERT, GPT-2, Llama, Mixtral, T5, diffusers UNet, kohya), and prefix resolution."""

from __future__ import annotations

import pytest

from lora_analysis.errors import ModuleResolutionError
from lora_analysis.naming import layer_of, layer_pattern, projection_type, resolve_module_name

# (path, layer_of, projection_type)
NAMES = [
    # BERT
    ("bert.encoder.layer.3.attention.self.query", ("bert.encoder.layer", 3), "q"),
    ("bert.encoder.layer.3.attention.self.key", ("bert.encoder.layer", 3), "k"),
    ("bert.encoder.layer.3.attention.self.value", ("bert.encoder.layer", 3), "v"),
    ("bert.encoder.layer.3.attention.output.dense", ("bert.encoder.layer", 3), "o"),
    ("bert.encoder.layer.3.intermediate.dense", ("bert.encoder.layer", 3), "mlp.up"),
    ("bert.encoder.layer.3.output.dense", ("bert.encoder.layer", 3), "mlp.down"),
    ("bert.encoder.layer.11.attention.self.query", ("bert.encoder.layer", 11), "q"),
    ("classifier.dense", None, "dense"),
    # GPT-2
    ("transformer.h.0.attn.c_attn", ("transformer.h", 0), "qkv"),
    ("transformer.h.0.attn.c_proj", ("transformer.h", 0), "o"),
    ("transformer.h.0.mlp.c_fc", ("transformer.h", 0), "mlp.up"),
    ("transformer.h.10.mlp.c_proj", ("transformer.h", 10), "mlp.down"),
    # Llama
    ("model.layers.7.self_attn.q_proj", ("model.layers", 7), "q"),
    ("model.layers.7.self_attn.o_proj", ("model.layers", 7), "o"),
    ("model.layers.7.mlp.gate_proj", ("model.layers", 7), "mlp.gate"),
    ("model.layers.7.mlp.up_proj", ("model.layers", 7), "mlp.up"),
    ("model.layers.7.mlp.down_proj", ("model.layers", 7), "mlp.down"),
    # Mixtral: the expert index is not the layer; the router is not a gate projection
    ("model.layers.3.block_sparse_moe.experts.7.w1", ("model.layers", 3), "mlp.gate"),
    ("model.layers.3.block_sparse_moe.experts.7.w3", ("model.layers", 3), "mlp.up"),
    ("model.layers.3.block_sparse_moe.experts.0.w2", ("model.layers", 3), "mlp.down"),
    ("model.layers.3.block_sparse_moe.gate", ("model.layers", 3), "router"),
    # T5: `layer.N` numbers sub-layers inside block N
    ("encoder.block.0.layer.0.SelfAttention.q", ("encoder.block", 0), "q"),
    ("encoder.block.5.layer.1.DenseReluDense.wo", ("encoder.block", 5), "mlp.down"),
    ("decoder.block.2.layer.1.EncDecAttention.k", ("decoder.block", 2), "k"),
    ("decoder.block.2.layer.0.SelfAttention.o", ("decoder.block", 2), "o"),
    # diffusers UNet: the stage is the layer; blocks inside it are parts
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", ("down_blocks", 1), "q"),
    ("up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0", ("up_blocks", 2), "o"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", ("down_blocks", 1), "mlp.up"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", ("down_blocks", 1), "mlp.down"),
    ("mid_block.attentions.0.proj_in", ("mid_block.attentions", 0), "proj_in"),
    # kohya: "_" separators
    # no known projection and no "." to cut at: the whole path is its own label
    ("lora_unet_down_blocks_1_attentions_0_proj_in", ("lora_unet_down_blocks", 1), "lora_unet_down_blocks_1_attentions_0_proj_in"),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_k", ("lora_unet_up_blocks", 3), "k"),
    ("lora_te_text_model_encoder_layers_0_self_attn_k_proj", ("lora_te_text_model_encoder_layers", 0), "k"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc1", ("lora_te_text_model_encoder_layers", 11), "mlp.up"),
]


@pytest.mark.parametrize("name, layer, projection", NAMES)
def test_layer_and_projection(name, layer, projection):
    assert layer_of(name) == layer
    assert projection_type(name) == projection


@pytest.mark.parametrize("name, layer, projection", NAMES)
def test_layer_pattern_replaces_exactly_the_layer_index(name, layer, projection):
    pattern = layer_pattern(name)
    if layer is None:
        assert pattern is None
        return
    stack, index = layer
    assert pattern.count("*") == 1 and pattern.replace("*", str(index)) == name
    assert pattern.startswith(stack)
    # Every layer of the same module gives the same pattern, other experts/blocks do not.
    assert layer_pattern(name.replace(f"{stack}{name[len(stack)]}{index}", f"{stack}{name[len(stack)]}{index + 1}", 1)) == pattern


def test_moe_experts_and_t5_sublayers_are_module_types_not_layers():
    assert layer_pattern("model.layers.3.block_sparse_moe.experts.7.w1") == "model.layers.*.block_sparse_moe.experts.7.w1"
    assert layer_pattern("model.layers.3.block_sparse_moe.experts.6.w1") != layer_pattern(
        "model.layers.3.block_sparse_moe.experts.7.w1")
    assert layer_pattern("encoder.block.3.layer.0.SelfAttention.q") == "encoder.block.*.layer.0.SelfAttention.q"


def test_resolve_module_name_across_prefixes():
    candidates = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    assert resolve_module_name("base_model.model.bert.encoder.layer.0.attention.self.query", candidates) == candidates[0]
    with pytest.raises(ModuleResolutionError, match="not found"):
        resolve_module_name("encoder.layer.1.attention.self.query", candidates)
