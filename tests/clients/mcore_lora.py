"""Megatron-Bridge's LoRA on a real megatron-core GPTModel, for the harness (test-only).

Megatron-Bridge cannot be installed in this environment, so its LoRA modules are rebuilt from
their source (``peft/utils.py`` ``ParallelLinearAdapter``, ``peft/lora_layers.py``
``LoRALinear``, ``peft/canonical_lora.py``) on top of megatron-core 0.16.1's own parallel layers
and sharding helpers, which do the real work of naming, sharding and loading:

* column-parallel base (``linear_qkv``, ``linear_fc1``): ``linear_in`` =
  ``ColumnParallelLinear(in, dim, gather_output=True)``, ``linear_out`` =
  ``ColumnParallelLinear(dim, out, gather_output=False)``;
* row-parallel base (``linear_proj``, ``linear_fc2``): ``linear_in`` =
  ``RowParallelLinear(in, dim, input_is_parallel=True)``, ``linear_out`` =
  ``ColumnParallelLinear(dim, out, gather_output=True)``;
* output ``(alpha / dim) · linear_out(linear_in(x))`` added to the base layer's output;
* ``sharded_state_dict``: ``<base>.adapter.linear_{in,out}.weight`` beside the base keys, the
  fc1 ``linear_out`` through ``apply_swiglu_sharded_factory`` (its base name holds
  ``linear_fc1``);
* CanonicalLoRA: ``adapter_q/k/v`` (outputs interleaved per KV group like the fused QKV) and
  ``adapter_gate/up`` (outputs concatenated), TP=1 only here: Bridge's ``_interleave_qkv``
  reshapes the TP-local output with the global head counts;
* MoE (SequentialMLP, local spec): every ``mlp.experts.local_experts.{k}.linear_fc1`` /
  ``linear_fc2`` and ``mlp.shared_experts.linear_fc*`` is wrapped like a dense MLP's, expert
  adapters with ``is_expert=True`` (Bridge's ``is_expert_linear``: expert TP group); megatron-core's
  ``SequentialMLP.sharded_state_dict`` re-keys them to the global expert
  (``mlp.experts.experts.linear_fc1.adapter.linear_in.weight`` ``[L, E, R, H]``).

``lora-save-random`` job: ``{hf_config, tp, base_ckpt, dim, alpha, seed, adapter_out, input_ids,
out, pad_vocab_to_multiple?}``: as ``lora-load-forward`` up to the base weights, then redraw
every adapter parameter (each TP shard its own draw), save the adapters alone with
``dist_checkpointing.save`` (Bridge's PEFT filter, what verl writes into ``model/dist_ckpt``)
to ``adapter_out`` and save rank 0's logits: a training run's LoRA save, made by megatron-core.

``lora-load-forward`` job: ``{hf_config, tp, base_ckpt, adapter_ckpt, dim, alpha, style,
input_ids, out, pad_vocab_to_multiple?, ep?, etp?, targets?}``: build the GPTModel (at the
job's TP / EP / expert TP), wrap its linear layers named in ``targets`` (default all four), load the
base weights from ``base_ckpt`` and the adapter (Bridge's PEFT filter: adapter keys, no
``_extra_state``) from ``adapter_ckpt`` with ``dist_checkpointing.load``, and save rank 0's logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["lora_load_forward", "lora_save_random"]


def _zeros(weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.zeros_(weight)


class ParallelLinearAdapter(torch.nn.Module):
    """Bridge's ParallelLinearAdapter (identity activation, no dropout), see module docstring."""

    def __init__(self, in_features: int, out_features: int, dim: int, alpha: float, *,
                 input_is_parallel: bool, is_fc1: bool, config: Any,
                 is_expert: bool = False) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.scale, self.is_fc1 = alpha / dim, is_fc1
        if input_is_parallel:
            self.linear_in = RowParallelLinear(in_features, dim, config=config,
                                               init_method=_zeros, bias=False,
                                               input_is_parallel=True, skip_bias_add=True,
                                               is_expert=is_expert)
        else:
            self.linear_in = ColumnParallelLinear(in_features, dim, config=config,
                                                  init_method=_zeros, bias=False,
                                                  gather_output=True, is_expert=is_expert)
        self.linear_out = ColumnParallelLinear(dim, out_features, config=config,
                                               init_method=_zeros, bias=False,
                                               gather_output=input_is_parallel,
                                               is_expert=is_expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_in(x)
        x, _ = self.linear_out(x)
        return x * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        sd = self.linear_in.sharded_state_dict(f"{prefix}linear_in.", sharded_offsets, metadata)
        out = self.linear_out.sharded_state_dict(f"{prefix}linear_out.", sharded_offsets,
                                                 metadata)
        if self.is_fc1:
            key = f"{prefix}linear_out.weight"
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets)
        sd.update(out)
        return sd


class CanonicalAdapters(torch.nn.Module):
    """CanonicalLoRA's adapters of one fused layer (``adapter_q`` ... or ``adapter_gate`` ...)."""

    def __init__(self, adapters: Mapping[str, ParallelLinearAdapter], *, groups: int = 0,
                 heads: int = 0, head_dim: int = 0) -> None:
        super().__init__()
        self.names = list(adapters)
        for name, adapter in adapters.items():
            self.add_module(name, adapter)
        self.groups, self.heads, self.head_dim = groups, heads, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = {name: getattr(self, name)(x) for name in self.names}
        if "adapter_gate" in outs:
            return torch.cat([outs["adapter_gate"], outs["adapter_up"]], dim=-1)
        g, d = self.groups, self.head_dim
        n = self.heads // g
        lead = outs["adapter_q"].shape[:-1]
        q = outs["adapter_q"].reshape(*lead, g, n * d)
        k = outs["adapter_k"].reshape(*lead, g, d)
        v = outs["adapter_v"].reshape(*lead, g, d)
        return torch.cat([q, k, v], dim=-1).reshape(*lead, -1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        sd: dict = {}
        for name in self.names:
            sd.update(getattr(self, name).sharded_state_dict(f"{prefix}{name}.", sharded_offsets,
                                                             metadata))
        return sd


class LoRALinear(torch.nn.Module):
    """Bridge's LoRALinear: base output + adapter output; the base keys stay the base's.

    The base layer is held outside the module tree and its parameters are registered here
    under their own names, so ``state_dict`` / ``sharded_state_dict`` keys are the unwrapped
    model's (``linear_qkv.weight``), as Bridge's AdapterWrapper keeps them.
    """

    def __init__(self, base: torch.nn.Module, adapter: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)
        for name, p in base.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        out, bias = self.base(x, *args, **kwargs)
        return out + self.adapter(x), bias

    def get_extra_state(self) -> Any:
        return self.base.get_extra_state()

    def set_extra_state(self, state: Any) -> None:
        self.base.set_extra_state(state)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        sd = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        sd.update(self.adapter.sharded_state_dict(f"{prefix}adapter.", sharded_offsets,
                                                  metadata))
        return sd


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def wrap_with_lora(model: Any, *, dim: int, alpha: float, style: str,
                   targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Wrap every linear layer named in ``targets``, as Bridge's LoRA / CanonicalLoRA match them:
    by the module's last name, anywhere in the decoder (attention, dense MLPs, shared experts
    and each SequentialMLP expert ``mlp.experts.local_experts.{k}.linear_fc1``). Expert adapters
    are built with ``is_expert=True`` (expert TP group), as Bridge's ``is_expert_linear`` does.
    The router is a ``TopKRouter``, never wrapped."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    config = model.config
    d, heads, groups = config.kv_channels, config.num_attention_heads, config.num_query_groups
    found = [(name, m) for name, m in model.decoder.named_modules()
             if name.rpartition(".")[2] in targets
             and isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    for name, base in found:
        parent_name, _, leaf = name.rpartition(".")
        row = isinstance(base, RowParallelLinear)
        is_expert = ".local_experts." in name

        def adapter(i: int, o: int, *, fc1: bool = False, row: bool = row,
                    is_expert: bool = is_expert) -> Any:
            return ParallelLinearAdapter(i, o, dim, alpha, input_is_parallel=row, is_fc1=fc1,
                                         config=config, is_expert=is_expert)

        h, out = base.input_size, base.output_size
        if style == "canonical" and leaf == "linear_qkv":
            wrapped: Any = CanonicalAdapters({"adapter_q": adapter(h, heads * d),
                                              "adapter_k": adapter(h, groups * d),
                                              "adapter_v": adapter(h, groups * d)},
                                             groups=groups, heads=heads, head_dim=d)
        elif style == "canonical" and leaf == "linear_fc1":
            wrapped = CanonicalAdapters({"adapter_gate": adapter(h, out // 2, fc1=True),
                                         "adapter_up": adapter(h, out // 2, fc1=True)})
        else:
            wrapped = adapter(h, out, fc1=leaf == "linear_fc1")
        setattr(model.decoder.get_submodule(parent_name), leaf, LoRALinear(base, wrapped))


def lora_load_forward(job: Mapping[str, Any], rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing

    from tests.clients.mcore_harness import (
        _check_tp,
        _save_rank0,
        build_gpt_model,
        gpt_forward,
        set_parallel,
    )

    _check_tp(job, world)
    ep, etp = int(job.get("ep", 1)), job.get("etp")
    set_parallel(int(job["tp"]), ep=ep, etp=etp)
    model = build_gpt_model(job["hf_config"], job["tp"], job.get("pad_vocab_to_multiple"),
                            ep=ep, etp=etp)
    wrap_with_lora(model, dim=int(job["dim"]), alpha=float(job["alpha"]), style=job["style"],
                   targets=tuple(job.get("targets") or LORA_TARGETS))
    adapter_sd = _adapter_state(model)
    base_sd = {k: v for k, v in model.sharded_state_dict().items() if ".adapter." not in k}
    loaded = dist_checkpointing.load(base_sd, str(job["base_ckpt"]))
    # Every adapter key must be in the checkpoint; the checkpoint may hold only the
    # common_state object besides (megatron-core >= 0.19's, which 0.16.1 does not request).
    adapters, not_requested, absent = dist_checkpointing.load(
        adapter_sd, str(job["adapter_ckpt"]), strict="return_all")
    if absent or set(not_requested) - {"common_state"}:
        raise RuntimeError(f"adapter checkpoint mismatch: absent {sorted(absent)}, not "
                           f"requested {sorted(not_requested)}")
    loaded.update(adapters)
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    left = [k for k in missing if not k.endswith("_extra_state")]
    if left or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {left}, unexpected {unexpected}")
    _save_rank0(gpt_forward(model, job["input_ids"]), job["out"], rank)


def _adapter_state(model: Any) -> dict:
    # Bridge's apply_peft_adapter_filter_to_state_dict: adapter keys, no _extra_state.
    return {k: v for k, v in model.sharded_state_dict().items()
            if ".adapter." in k and "_extra_state" not in k}


def lora_save_random(job: Mapping[str, Any], rank: int, world: int) -> None:
    import zlib

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from tests.clients.mcore_harness import (
        _check_tp,
        _save_rank0,
        build_gpt_model,
        gpt_forward,
        set_parallel,
    )

    _check_tp(job, world)
    set_parallel(int(job["tp"]))
    model = build_gpt_model(job["hf_config"], job["tp"], job.get("pad_vocab_to_multiple"))
    wrap_with_lora(model, dim=int(job["dim"]), alpha=float(job["alpha"]), style="fused")
    base_sd = {k: v for k, v in model.sharded_state_dict().items() if ".adapter." not in k}
    missing, unexpected = model.load_state_dict(
        dist_checkpointing.load(base_sd, str(job["base_ckpt"])), strict=False)
    left = [k for k in missing if ".adapter." not in k and not k.endswith("_extra_state")]
    if left or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {left}, unexpected {unexpected}")
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:  # every adapter weight is TP-split: one draw per shard
                key = zlib.crc32(name.encode()) ^ (int(job["seed"]) * 1_000_003) ^ \
                    ((tp_rank + 1) * 7919)
                gen = torch.Generator().manual_seed(key)
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    out = Path(job["adapter_out"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_adapter_state(model), str(out))
    dist.barrier()
    _save_rank0(gpt_forward(model, job["input_ids"]), job["out"], rank)
