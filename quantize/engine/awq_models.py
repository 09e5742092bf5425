"""AutoAWQ layer maps for the families AutoAWQ 0.2.9 does not describe, and the lookup of every family's map.

An AutoAWQ "model class" is data about one architecture: where the blocks are, what to move to
the device with them, and which linears read the same activation from which previous operation
(``get_layers_for_scaling``).  AWQ divides that activation by per-channel scales ``s`` and
multiplies the linears' input columns by ``s``, folding ``1/s`` into the previous operation, so a
group is only legal where the previous operation's output reaches those linears and nothing
else, channel for channel.  Each class here says why its groups are.

:data:`ADAPTERS` holds our classes by ``config.model_type``; :data:`MODEL_CLASSES` looks there
first and then in AutoAWQ's own ``AWQ_CAUSAL_LM_MODEL_MAP`` (which is not modified).  A new family
is a class plus a row here, its ``awq_layer_map`` in the family's row (:mod:`quantize.architectures`), and a test;
a class written here from scratch reads the groups whose previous operation is a norm from that row (:func:`row_group`).
"""

from __future__ import annotations

from collections import ChainMap
from typing import Any

from torch import nn

from quantize.architectures import BLOCK, GEMMA3, Architecture, ScaleGroup
from quantize.engine.autoawq_compat import AWQ_CAUSAL_LM_MODEL_MAP, AwqConfig, BaseAWQForCausalLM

__all__ = ["ADAPTERS", "MODEL_CLASSES", "Gemma3AWQForCausalLM", "Phi3AWQForCausalLM", "v_to_o_is_exact", "wrap_model"]


def v_to_o_is_exact(attn: Any) -> bool:
    """Whether scales folded from ``o_proj``'s input columns into ``v_proj``'s output rows leave attention unchanged.

    Attention mixes value vectors over positions with weights that come from q and k only, so
    each output channel of a head is a linear function of the same channel of that head's values.
    Dividing value channel ``c`` by ``s_c`` and multiplying ``o_proj``'s column ``c`` by ``s_c`` is
    exact when column ``c`` reads value channel ``c`` and no other: one key/value head per query
    head.  With grouped-query attention a value channel feeds one column per query head of its
    group, and AutoAWQ's search picks a separate scale per column, so there is nothing consistent
    to fold.  A norm on the values (``v_norm``, as Gemma 3n has) would also undo the scales.
    AutoAWQ's own maps test ``v_proj.weight.shape == o_proj.weight.shape``, which also needs
    ``heads x head_dim == hidden_size`` and so misses exact cases such as 8 heads of 64 on a
    hidden size of 256 (llm-awq PR #67 is where the shape test comes from).
    """
    v, o = attn.v_proj, attn.o_proj
    return v.out_features == o.in_features and getattr(attn, "v_norm", None) is None


def block_groups(family: Architecture) -> list[ScaleGroup]:
    """The row's scale groups inside a decoder block, in block order."""
    return [g for g in family.scale_groups if g.prev.startswith(BLOCK)]


def row_group(block: Any, group: ScaleGroup, input_feat: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One of a row's block scale groups as AutoAWQ's scale search takes it, for ``block``: the previous
    operation, its readers, their cached input (the first reader's) and the module whose output
    the search compares (:attr:`ScaleGroup.inspect`), plus ``extra``."""
    readers = [name.removeprefix(BLOCK) for name in group.readers]
    out = {"prev_op": block.get_submodule(group.prev.removeprefix(BLOCK)),
           "layers": [block.get_submodule(name) for name in readers], "inp": input_feat[readers[0]]}
    if group.inspect is not None:
        out["module2inspect"] = block.get_submodule(group.inspect.removeprefix(BLOCK))
    return {**out, **extra}


class Gemma3AWQForCausalLM(BaseAWQForCausalLM):
    """``Gemma3ForCausalLM`` (``model_type`` ``gemma3_text``), the text-only Gemma 3 of transformers >= 4.50.

    A block is ``x + post_attention_layernorm(attn(input_layernorm(x)))`` and then
    ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``; inside attention, q and
    k get a per-head RMSNorm (``q_norm``/``k_norm``) *after* their projections, then rotary
    embeddings (base 10k on sliding-window layers, 1M on full-attention ones).  The groups (the two
    whose previous operation is a norm are the family's row's, :data:`quantize.architectures.GEMMA3`,
    with the module each compares; the other two are AWQ's alone):

    * ``input_layernorm`` -> q, k, v.  The scales act on the projections' *inputs*; their outputs,
      and so what ``q_norm``/``k_norm`` see, are unchanged.  (Scaling q's or k's *outputs* would not
      be: the per-head RMSNorm divides by their root mean square.)  The search's loss is the
      whole attention module's output, norms and rotary embedding included.
    * ``v_proj`` -> ``o_proj`` only where :func:`v_to_o_is_exact` (no grouped-query sharing).  Every
      released Gemma 3 (270M to 27B) uses grouped-query attention, so there ``o_proj`` gets
      AutoAWQ's clip search but no scales.
    * ``pre_feedforward_layernorm`` -> gate, up.  Not ``post_attention_layernorm``, which in Gemma
      normalises the attention output before the residual add and feeds no linear.
    * ``up_proj`` -> ``down_proj``: ``down(gelu(gate(x)) * up(x))`` is linear in each channel of ``up``.

    ``o_proj`` and ``down_proj`` write into the post-norms, whose per-token root mean square would
    undo any scale folded into their output rows, so they are never a previous operation.  All
    four block norms compute ``x_hat * (1 + w)`` (the row stores them as ``w + 1``): AutoAWQ folds
    ``1/s`` into them correctly only with :func:`quantize.engine.autoawq_compat.offset_norms_folded`
    in force.
    """

    layer_type = "Gemma3DecoderLayer"
    max_seq_len_key = "max_position_embeddings"

    @staticmethod
    def get_model_layers(model: Any) -> nn.ModuleList:
        return model.model.layers

    @staticmethod
    def get_act_for_scaling(module: Any) -> dict[str, Any]:
        return {"is_scalable": False}  # GELU is applied to gate_proj only, which up_proj's scales do not touch

    @staticmethod
    def move_embed(model: Any, device: str) -> None:
        # The rotary embedding holds one inverse-frequency buffer per layer type.
        model.model.embed_tokens = model.model.embed_tokens.to(device)
        model.model.rotary_emb = model.model.rotary_emb.to(device)

    @staticmethod
    def get_layers_for_scaling(module: Any, input_feat: dict[str, Any], module_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        attn, mlp = module.self_attn, module.mlp
        attn_norm, ffn_norm = block_groups(GEMMA3)
        groups = [row_group(module, attn_norm, input_feat, kwargs=module_kwargs)]
        if v_to_o_is_exact(attn):
            groups.append({"prev_op": attn.v_proj, "layers": [attn.o_proj], "inp": input_feat["self_attn.o_proj"]})
        groups.append(row_group(module, ffn_norm, input_feat))
        groups.append({"prev_op": mlp.up_proj, "layers": [mlp.down_proj], "inp": input_feat["mlp.down_proj"]})
        return groups


class Phi3AWQForCausalLM(AWQ_CAUSAL_LM_MODEL_MAP["phi3"]):  # type: ignore[misc,valid-type,name-defined]
    """AutoAWQ's own ``Phi3ForCausalLM`` map, without its ``qkv_proj -> o_proj`` group where that is not exact.

    AutoAWQ folds that group's scales into the *last* ``o_proj.in_features`` rows of the fused
    ``qkv_proj`` (``scale_fc_fc``).  Those are the value rows only when there are as many key/value
    heads as query heads (Phi-3-mini); with grouped-query attention (Phi-3-medium 40/10, Phi-4-mini
    24/8) they reach into the key rows and change the attention scores, and a value channel feeds
    several ``o_proj`` columns anyway (:func:`v_to_o_is_exact`).  Such blocks keep the other three
    groups and ``o_proj`` gets the clip search only.
    """

    @staticmethod
    def get_layers_for_scaling(module: Any, input_feat: dict[str, Any], module_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        groups = AWQ_CAUSAL_LM_MODEL_MAP["phi3"].get_layers_for_scaling(module, input_feat, module_kwargs)
        attn = module.self_attn
        if attn.qkv_proj.out_features == 3 * attn.o_proj.in_features:  # q, k, v of one width: no sharing
            return list(groups)
        return [g for g in groups if g["prev_op"] is not attn.qkv_proj]


# config.model_type -> our AutoAWQ model class, for families AutoAWQ 0.2.9 lacks or maps wrongly.
ADAPTERS: dict[str, type[BaseAWQForCausalLM]] = {
    "gemma3_text": Gemma3AWQForCausalLM,
    "phi3": Phi3AWQForCausalLM,
}
MODEL_CLASSES: ChainMap[str, type[BaseAWQForCausalLM]] = ChainMap(ADAPTERS, AWQ_CAUSAL_LM_MODEL_MAP)


def wrap_model(model: Any, model_type: str) -> BaseAWQForCausalLM:
    """AutoAWQ's per-family wrapper (layer map, embedding mover) around a model we loaded ourselves."""
    cls = MODEL_CLASSES[model_type]
    return cls(model, model_type, is_quantized=False, config=model.config, quant_config=AwqConfig(), processor=None)
