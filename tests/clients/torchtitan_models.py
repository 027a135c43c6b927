"""torchtitan 0.3.0 as a real client, on CPU (tests only).

``import_torchtitan()`` imports torchtitan (tools/setup.sh installs it ``--no-deps`` with the few
packages its model and checkpointer modules import); :func:`titan_model` builds a torchtitan
llama3 / qwen3 / qwen3 MoE / deepseek_v3 model whose sizes are those of an HF config, from
torchtitan's own config builders, and :func:`adapter` its ``StateDictAdapter`` (the oracle for
names and layouts: ``from_hf`` / ``to_hf``). :func:`checkpointer` is torchtitan's own
``CheckpointManager`` over one model, without optimizer, dataloader or scheduler: what it
loads at step 0 (model only) and saves at any step.

The platform shim: ``torchtitan.models.common`` imports ``minimal_async_ep``, whose kernels
module imports Triton at import time (GPU expert-parallel all-to-all kernels, which a CPU model
never launches; Triton's wheel is ~1 GB and, once importable, makes torch's dynamo believe a GPU
compiler exists). That one module is registered as a stand-in whose kernels raise if launched;
everything else is torchtitan's code, unchanged.

Model choices that make torchtitan compute what transformers computes (for the logits checks):
RoPE without scaling at the HF ``rope_theta``; RMSNorm ``eps`` equal to the HF config's
(torchtitan's llama3 and deepseek_v3 builders use its default 1e-5, so their HF models are made
with ``rms_norm_eps=1e-5``); DeepSeek routing as the HF config says (sigmoid, groups, top-k
group, renormalised, ``routed_scaling_factor``); Qwen3-MoE's softmax top-k renormalised.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FAMILIES", "adapter", "checkpointer", "import_torchtitan", "titan_logits",
           "titan_model"]

FAMILIES = {"llama": "llama3", "qwen3": "qwen3", "qwen3_moe": "qwen3", "deepseek_v3": "deepseek_v3",
            "gpt_oss": "gpt_oss"}
"""HF model_type -> the torchtitan model package that has it."""

_EP_KERNELS = "torchtitan.distributed.minimal_async_ep.kernels"
_KERNELS = ("copy_full_counts_to_peers_kernel", "copy_rows_to_peers_kernel",
            "expand_topk_grad_kernel", "fill_combine_metadata_kernel",
            "fill_dispatch_metadata_kernel", "invert_flat_indices_kernel",
            "reduce_topk_slots_kernel", "topk_scores_grad_kernel")


# torchtitan's own initialisers (every parameter must have one; the values are overwritten by
# each test's load).
_LINEAR = {"weight": partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}
_NORM = {"weight": nn.init.ones_}
_EMBEDDING = {"weight": partial(nn.init.normal_, std=1.0)}


def _no_triton_kernel(name: str):
    def launch(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{name} is a Triton GPU kernel; the CPU tests never launch it")
    return launch


def import_torchtitan() -> types.ModuleType:
    """``torchtitan`` with the Triton kernel module stood in for (see the module docstring)."""
    if _EP_KERNELS not in sys.modules:
        stand_in = types.ModuleType(_EP_KERNELS)
        for name in _KERNELS:
            setattr(stand_in, name, _no_triton_kernel(name))
        sys.modules[_EP_KERNELS] = stand_in
    return importlib.import_module("torchtitan")


def _hf(hf_dir: Path) -> dict[str, Any]:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def _rope_theta(hf: dict[str, Any]) -> float:
    return float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta")))


def _common(hf: dict[str, Any], layers: list, *, eps: float, tied: bool = False):
    from torchtitan.models.common import Embedding, Linear, RMSNorm

    dim, vocab = hf["hidden_size"], hf["vocab_size"]
    return dict(dim=dim, vocab_size=vocab, layers=layers,
                tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim,
                                                param_init=_EMBEDDING),
                norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=_NORM),
                lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=_LINEAR),
                enable_weight_tying=tied)


def _llama3(hf: dict[str, Any], mtp: bool):
    from torchtitan.models.common import ComplexRoPE, RMSNorm
    from torchtitan.models.common.config_utils import (
        get_attention_config,
        make_ffn_config,
        make_gqa_config,
    )
    from torchtitan.models.llama3 import Llama3Model
    from torchtitan.models.llama3.model import Llama3TransformerBlock

    dim, heads, eps = hf["hidden_size"], hf["num_attention_heads"], hf["rms_norm_eps"]
    head_dim = hf.get("head_dim") or dim // heads
    rope = ComplexRoPE.Config(dim=head_dim, max_seq_len=hf["max_position_embeddings"],
                              theta=_rope_theta(hf), scaling="none")
    layers = [Llama3TransformerBlock.Config(
        attention_norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=_NORM),
        ffn_norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=_NORM),
        # fuse_qkv as torchtitan's llama3 flavors: one wqkv module, saved as wq / wk / wv.
        attention=make_gqa_config(dim=dim, n_heads=heads, n_kv_heads=hf["num_key_value_heads"],
                                  head_dim=head_dim, wqkv_param_init=_LINEAR, wo_param_init=_LINEAR,
                                  inner_attention=get_attention_config("flex"), fuse_qkv=True,
                                  rope=rope),
        feed_forward=make_ffn_config(dim=dim, hidden_dim=hf["intermediate_size"],
                                     w1_param_init=_LINEAR, w2w3_param_init=_LINEAR))
        for _ in range(hf["num_hidden_layers"])]
    return Llama3Model.Config(**_common(hf, layers, eps=eps,
                                        tied=hf.get("tie_word_embeddings", False)))


def _qwen3(hf: dict[str, Any], mtp: bool):
    from torchtitan.models.common import CosSinRoPE
    from torchtitan.models.qwen3 import Qwen3Model, _build_qwen3_layers, _build_qwen3_moe_layers

    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    rope = CosSinRoPE.Config(dim=head_dim, max_seq_len=hf["max_position_embeddings"],
                             theta=_rope_theta(hf))
    common = dict(n_layers=hf["num_hidden_layers"], dim=dim, n_heads=heads,
                  n_kv_heads=hf["num_key_value_heads"], head_dim=head_dim, fuse_qkv=True,
                  attn_backend="flex", rope=rope)
    if hf["model_type"] == "qwen3_moe":
        layers = _build_qwen3_moe_layers(**common, moe_hidden_dim=hf["moe_intermediate_size"],
                                         num_experts=hf.get("num_experts")
                                         or hf["num_local_experts"],
                                         top_k=hf["num_experts_per_tok"],
                                         moe_comm_backend="standard")
    else:
        layers = _build_qwen3_layers(**common, hidden_dim=hf["intermediate_size"])
    # _build_qwen3_* use torchtitan's Qwen3 eps, 1e-6: the HF configs' too.
    return Qwen3Model.Config(**_common(hf, layers, eps=1e-6,
                                       tied=hf.get("tie_word_embeddings", False)))


def _deepseek_v3(hf: dict[str, Any], mtp: bool):
    from torchtitan.models.common import ComplexRoPE
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model, _build_dsv3_layers, _build_mtp_layers

    dim = hf["hidden_size"]
    rope = ComplexRoPE.Config(dim=hf["qk_rope_head_dim"], max_seq_len=hf["max_position_embeddings"],
                              theta=_rope_theta(hf), scaling="none")
    groups = hf.get("n_group") or 1
    layers = _build_dsv3_layers(
        n_layers=hf["num_hidden_layers"], n_dense_layers=hf["first_k_dense_replace"], dim=dim,
        n_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"], mscale=1.0,
        dense_hidden_dim=hf["intermediate_size"], moe_hidden_dim=hf["moe_intermediate_size"],
        num_experts=hf["n_routed_experts"], num_shared_experts=hf["n_shared_experts"],
        router_top_k=hf["num_experts_per_tok"], router_score_func="sigmoid",
        router_num_expert_groups=groups if groups > 1 else None,
        router_num_limited_groups=hf.get("topk_group") if groups > 1 else None,
        router_route_scale=hf["routed_scaling_factor"],
        router_route_norm=hf.get("norm_topk_prob", True), attn_backend="flex",
        moe_comm_backend="standard", non_blocking_capacity_factor=None, rope=rope)
    mtp = _build_mtp_layers(layers[-1], dim=dim,
                            num_mtp_layers=(hf.get("num_nextn_predict_layers") or 0) if mtp else 0)
    return DeepSeekV3Model.Config(**_common(hf, layers, eps=1e-5), mtp_layers=mtp)


def _gpt_oss(hf: dict[str, Any], mtp: bool):
    import dataclasses

    from torchtitan.models.common import CosSinRoPE, Linear, RMSNorm
    from torchtitan.models.common.moe import TokenChoiceTopKRouter
    from torchtitan.models.gpt_oss import (
        GptOssModel,
        _make_gptoss_attn_config,
        _make_gptoss_experts_config,
    )
    from torchtitan.models.gpt_oss.model import GptOssTransformerBlock
    from torchtitan.models.gpt_oss.moe import GptOssMoE

    dim, experts, eps = hf["hidden_size"], hf["num_local_experts"], hf["rms_norm_eps"]
    yarn = hf["rope_parameters"]
    rope = CosSinRoPE.Config(dim=hf["head_dim"], max_seq_len=hf["max_position_embeddings"],
                             theta=yarn["rope_theta"], scaling="yarn", rope_factor=yarn["factor"],
                             beta_fast=yarn["beta_fast"], beta_slow=yarn["beta_slow"],
                             truncate=yarn["truncate"],
                             original_seq_len=yarn["original_max_position_embeddings"])
    layers = []
    # torchtitan's _build_gptoss_layers with the HF config's heads, window and swiglu limit
    # (the builder fixes 64 heads, a 128-token window on even layers and limit 7).
    for i, kind in enumerate(hf["layer_types"]):
        attention = _make_gptoss_attn_config(
            dim=dim, layer_id=i, attn_backend="flex", n_heads=hf["num_attention_heads"],
            n_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
            sliding_window_size=hf["sliding_window"] if kind == "sliding_attention" else None,
            fuse_qkv=True, rope=rope)
        routed = _make_gptoss_experts_config(
            dim=dim, hidden_dim=hf["intermediate_size"], num_experts=experts, layer_id=i,
            top_k=hf["num_experts_per_tok"], moe_comm_backend="standard")
        routed = dataclasses.replace(routed, inner_experts=dataclasses.replace(
            routed.inner_experts, swiglu_limit=hf["swiglu_limit"]))
        router = TokenChoiceTopKRouter.Config(
            num_experts=experts, score_func="softmax", route_norm=True,
            top_k=hf["num_experts_per_tok"],
            gate=Linear.Config(in_features=dim, out_features=experts, bias=True,
                               param_init=_LINEAR))
        layers.append(GptOssTransformerBlock.Config(
            attention=attention,
            attention_norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=_NORM),
            ffn_norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=_NORM),
            moe=GptOssMoE.Config(num_experts=experts, load_balance_coeff=1e-3,
                                 routed_experts=routed, router=router)))
    return GptOssModel.Config(**_common(hf, layers, eps=eps,
                                        tied=hf.get("tie_word_embeddings", False)))


_BUILDERS = {"llama3": _llama3, "qwen3": _qwen3, "deepseek_v3": _deepseek_v3,
             "gpt_oss": _gpt_oss}


def titan_config(hf_dir: Path, *, mtp: bool = False):
    """torchtitan's model config for the HF model saved at ``hf_dir``; with ``mtp``, the MTP
    layers its config announces (transformers neither builds nor saves them)."""
    import_torchtitan()
    hf = _hf(hf_dir)
    return _BUILDERS[FAMILIES[hf["model_type"]]](hf, mtp)


def titan_model(hf_dir: Path, *, mtp: bool = False) -> torch.nn.Module:
    """The torchtitan model of ``hf_dir``'s sizes, fp32 on CPU, buffers (RoPE cache, expert
    bias) initialised as torchtitan's trainer does; its weights are torchtitan's random init."""
    config = titan_config(hf_dir, mtp=mtp)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model.eval()


def adapter(hf_dir: Path, *, mtp: bool = False):
    """torchtitan's ``StateDictAdapter`` for ``hf_dir``'s model (no HF assets path)."""
    import_torchtitan()
    family = FAMILIES[_hf(hf_dir)["model_type"]]
    module = importlib.import_module(f"torchtitan.models.{family}.state_dict_adapter")
    cls = next(getattr(module, n) for n in dir(module)
               if n.endswith("StateDictAdapter") and n not in ("StateDictAdapter",
                                                                "MoEStateDictAdapter"))
    return cls(titan_config(hf_dir, mtp=mtp), None)


def checkpointer(model: torch.nn.Module, folder: Path, hf_dir: Path, *, mtp: bool = False,
                 train: bool = False):
    """torchtitan's ``CheckpointManager`` for ``model`` over ``folder`` (its checkpoint folder:
    ``step-N/`` below it); ``interval=1`` (every step is a save step), ``keep_latest_k=0``
    (purging asks the process group for a rank), no dataloader.

    Without ``train`` there is no optimizer or scheduler either: what a step-0 load restores
    (model only). With ``train``, torchtitan's own AdamW container (``default_adamw``) and
    warmup scheduler take one step first, so a save holds ``optimizer.*`` (exp_avg,
    exp_avg_sq, step, param groups) and ``lr_scheduler.*`` beside the changed model. The
    step's gradients are drawn at random: FlexAttention has no backward on CPU."""
    import_torchtitan()
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    optimizers = schedulers = None
    if train:
        optimizers = default_adamw(lr=1e-2).build(model_parts=[model])
        schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(
            optimizers=optimizers, training_steps=10)
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.grad = 0.1 * torch.randn(p.shape, generator=gen)
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
    config = CheckpointManager.Config(enable=True, folder=str(folder), keep_latest_k=0,
                                      interval=1, initial_load_model_only=False)
    return CheckpointManager(config, dataloader=None, model_parts=[model],
                             optimizers=optimizers, lr_schedulers=schedulers, states={},
                             sd_adapter=adapter(hf_dir, mtp=mtp))


@torch.no_grad()
def titan_logits(model: torch.nn.Module, ids: list[list[int]], *, heads: int = 1
                 ) -> tuple[torch.Tensor, ...]:
    """Logits [batch, seq, vocab] of torchtitan's forward: the main head's, then (``heads``
    > 1) each MTP depth's."""
    tokens = torch.tensor(ids)
    # One document per row: positions 0..L-1, and flex attention's causal block mask.
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    out = model(tokens, positions, model.get_attention_masks(positions))
    outs = out if isinstance(out, list) else [out]
    if len(outs) != heads:
        raise AssertionError(f"torchtitan gave {len(outs)} outputs, expected {heads}")
    return tuple(o.float() for o in outs)
