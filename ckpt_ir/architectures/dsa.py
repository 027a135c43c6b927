"""DeepSeek-V3.2 (``deepseek_v32``) and GLM-5 (``glm_moe_dsa``): DeepSeek sparse attention (DSA),
i.e. deepseek_v3 plus a *lightning indexer* in every layer's attention.

Everything but the indexer is deepseek_v3's rows and config reading (MLA, dense-first layers,
sigmoid routing with a score-correction bias, shared experts, MTP), with each family's
transformers defaults and ``mlp_layer_types``. The indexer of HF layer ``l`` (MTP layers
included: the MTP layer is a full decoder layer) maps name for name, as Megatron-Bridge's
``GLM5Bridge`` maps it (identity copies; the linears are ``duplicated``, whole on every TP
rank), under ``model.layers.{l}.self_attn.indexer.`` and
``decoder.layers.{l}.self_attention.core_attention.indexer.``::

    HF self_attn.indexer.   shape                  megatron-core core_attention.indexer.
    wq_b.weight             [n_i * d_i, q_lora]    linear_wq_b.weight
    wk.weight               [d_i, H]               linear_wk.weight
    k_norm.weight / .bias   [d_i]  (a LayerNorm)   k_norm.weight / k_norm.bias
    weights_proj.weight     [n_i, H]               linear_weights_proj.weight

(``n_i`` = ``index_n_heads``, ``d_i`` = ``index_head_dim``.) The identity is right for the
indexer of Megatron-LM after 0.16.1, which applies its RoPE to the *first*
``qk_rope_head_dim`` dims of each index head as HF does. megatron-core 0.16.1's ``DSAIndexer``
rotates the *last* ones, so a checkpoint for that version needs each head's rows rotated by
``qk_rope_head_dim`` (slime's ``_dsa_reorder``); 0.16.1 cannot build a DSA model from its
local spec at all (no ``"dsa"`` dispatch, TE-only block spec), so ckpt-ir writes the
Megatron-Bridge layout and says so here and in docs/moe.md.

GLM-5.2's "shared" indexer layers (``indexer_types``; they reuse the previous layer's top-k and
hold no indexer weights) are refused for now; every GLM-5 / 5.1 layer is "full".

Facts: /work/shared/reference/architectures-wave2.md section 8 (transformers 5.23
``DeepseekV32Indexer`` / ``GlmMoeDsaIndexer`` tensor lists, ``glm_moe_dsa/glm5_bridge.py``
@067f987d, megatron-core 0.16.1 ``dsa.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.deepseek_v3 import DEEPSEEK_V3, DEEPSEEK_V3_MCORE_ROWS
from ckpt_ir.architectures.glm4_moe import mlp_layer_types_moe_layers, sigmoid_router
from ckpt_ir.architectures.record import MegatronFields, MegatronMoe, hf_int
from ckpt_ir.architectures.schema import decoder_schema
from ckpt_ir.errors import FormatError
from ckpt_ir.table_engine import Row, one

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["DEEPSEEK_V32", "DSA_MCORE_ROWS", "GLM_MOE_DSA", "INDEXER_TENSORS", "dsa_schema"]

# HF name under self_attn.indexer. -> megatron-core name under core_attention.indexer.
INDEXER_TENSORS: tuple[tuple[str, str], ...] = (
    ("wq_b.weight", "linear_wq_b.weight"),
    ("wk.weight", "linear_wk.weight"),
    ("k_norm.weight", "k_norm.weight"),
    ("k_norm.bias", "k_norm.bias"),
    ("weights_proj.weight", "linear_weights_proj.weight"),
)


def _indexer_rows(native: str, hf: str) -> tuple[Row, ...]:
    return tuple(Row(native + "self_attention.core_attention.indexer." + m,
                     one(hf + "self_attn.indexer." + h)) for h, m in INDEXER_TENSORS)


DSA_MCORE_ROWS: tuple[Row, ...] = (
    *DEEPSEEK_V3_MCORE_ROWS,
    *_indexer_rows("decoder.layers.{layer}.", "model.layers.{layer}."),
    *_indexer_rows("mtp.layers.{mtp}.transformer_layer.", "model.layers.{mtp_layer}."),
)


def _indexer_sizes(hf: Mapping[str, Any]) -> tuple[int, int]:
    """``index_n_heads``, ``index_head_dim`` (transformers' defaults: 64, 128)."""
    return hf_int(hf, "index_n_heads", default=64), hf_int(hf, "index_head_dim", default=128)


def dsa_schema(config: ModelConfig) -> dict[str, Shape]:
    """deepseek_v3's tensors, each layer's indexer after its attention projections."""
    heads, dim = _indexer_sizes(config.hf)
    h, q_lora = config.hidden_size, config.q_lora_rank
    shapes: dict[str, Shape] = {"wq_b.weight": (heads * dim, q_lora), "wk.weight": (dim, h),
                                "k_norm.weight": (dim,), "k_norm.bias": (dim,),
                                "weights_proj.weight": (heads, h)}
    out: dict[str, Shape] = {}
    for name, shape in decoder_schema(config).items():
        out[name] = shape
        if name.startswith("model.layers.") and name.endswith(".self_attn.o_proj.weight"):
            prefix = name.removesuffix("o_proj.weight") + "indexer."
            out.update({prefix + n: shapes[n] for n, _ in INDEXER_TENSORS})
    return out


def _indexer_types(hf: Mapping[str, Any], layers: int) -> list[str]:
    """transformers' ``GlmMoeDsaConfig`` schedule: ``indexer_types``, else
    ``index_topk_pattern`` ("F"/"S" per layer), else ``index_topk_freq`` from
    ``index_skip_topk_offset``; DeepSeek-V3.2 has none of these (every layer full)."""
    types = hf.get("indexer_types")
    if types is None:
        pattern = hf.get("index_topk_pattern")
        if isinstance(pattern, str):
            types = [{"F": "full", "S": "shared"}.get(c, c) for c in pattern]
        elif pattern is not None:
            types = pattern
        else:
            freq = max(hf_int(hf, "index_topk_freq", default=1), 1)
            offset = hf_int(hf, "index_skip_topk_offset", default=2)
            types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared"
                     for i in range(layers)]
    if type(types) is not list or len(types) != layers or any(
            t not in ("full", "shared") for t in types):
        raise ValueError(f"indexer_types must list 'full' or 'shared' for each of {layers} "
                         "layers")
    return types


def _fields(first_dense_default: int):
    def fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
        out = DEEPSEEK_V3.hf_fields(hf, layers)  # type: ignore[misc]  # a MoE record
        first = min(hf_int(hf, "first_k_dense_replace", default=first_dense_default), layers)
        out["moe_layers"] = mlp_layer_types_moe_layers(
            hf, layers, ["dense"] * first + ["sparse"] * (layers - first))
        heads, dim = _indexer_sizes(hf)
        if heads <= 0 or dim <= 0:
            raise ValueError("index_n_heads and index_head_dim must be positive")
        shared = [i for i, t in enumerate(_indexer_types(hf, layers)) if t == "shared"]
        if shared:
            raise FormatError(f"{hf.get('model_type')} with 'shared' indexer layers "
                              f"({len(shared)} of {layers}, e.g. layer {shared[0]}) is not "
                              "supported: they hold no indexer weights")
        return out

    return fields


def _check(config: ModelConfig) -> None:
    DEEPSEEK_V3.check_moe(config)  # type: ignore[misc]  # a MoE record
    if config.q_lora_rank <= 0:
        # The indexer's wq_b reads the q_lora activations.
        raise FormatError(f"{config.architecture} needs q_lora_rank > 0 (the indexer's wq_b "
                          "projects the q_lora activations)")


def _router(groups: int, group_topk: int, scale: float) -> MegatronFields:
    """The family's routing, plus the indexer's TransformerConfig fields (megatron-core 0.16.1
    names; its local spec cannot build DSA, see the module docstring)."""
    route = sigmoid_router(groups, group_topk, scale)

    def router(config: ModelConfig, notes: list[str]) -> dict[str, Any]:
        heads, dim = _indexer_sizes(config.hf)
        notes.append("DSA indexer: megatron-core 0.16.1's local spec cannot build it, and its "
                     "DSAIndexer applies RoPE to the last qk_rope_head_dim dims of each index "
                     "head where the checkpoint (Megatron-Bridge's layout) has them first")
        return {**route(config, notes), "experimental_attention_variant": "dsa",
                "dsa_indexer_n_heads": heads, "dsa_indexer_head_dim": dim,
                "dsa_indexer_topk": hf_int(config.hf, "index_topk", default=2048)}

    return router


def _from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    out = DEEPSEEK_V3.hf_moe_from_megatron(args, moe)  # type: ignore[misc]  # a MoE record
    out["mlp_layer_types"] = ["sparse" if v else "dense" for v in moe.pattern]
    for hf_name, mcore in (("index_n_heads", "dsa_indexer_n_heads"),
                           ("index_head_dim", "dsa_indexer_head_dim"),
                           ("index_topk", "dsa_indexer_topk")):
        if args.get(mcore) is not None:
            out[hf_name] = int(args[mcore])
    return out


_DSA = dataclasses.replace(
    DEEPSEEK_V3, tables={"mcore": DSA_MCORE_ROWS, "hf": DEEPSEEK_V3.tables["hf"]},
    schema=dsa_schema, check_moe=_check, hf_moe_from_megatron=_from_megatron,
    megatron_guess=None)

# transformers' DeepseekV32Config / GlmMoeDsaConfig defaults for the routing fields.
DEEPSEEK_V32 = dataclasses.replace(_DSA, name="deepseek_v32", hf_class="DeepseekV32",
                                   hf_fields=_fields(3), megatron_moe=_router(8, 4, 2.5))
GLM_MOE_DSA = dataclasses.replace(_DSA, name="glm_moe_dsa", hf_class="GlmMoeDsa",
                                  hf_fields=_fields(3), megatron_moe=_router(1, 1, 2.5))

