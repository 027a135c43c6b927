"""Real megatron-core 0.16.1 on CPU/gloo, one process per TP rank: test-only shims and workers.

The test process never initialises ``torch.distributed``; it calls :func:`launch`, which starts
``python -m tests.clients.mcore_harness <command> <json-args>`` once per rank with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set. Commands:

``load-forward``
    ``{ckpt, hf_config, tp, pad_vocab_to_multiple?, input_ids, out, strict, allow_missing?}``:
    build a GPTModel from :func:`ckpt_ir.megatron_config.megatron_args` (local layer spec), load
    ``ckpt`` with ``dist_checkpointing.load(..., strict=strict)``, run a forward pass; rank 0
    saves the gathered logits [batch, seq, padded_vocab] to ``out``. ``strict="raise_all"``
    with ``allow_missing`` (checkpoint keys the model may leave unrequested) loads with
    ``return_all`` and raises on any other mismatch. Optional ``ep`` / ``etp`` (both commands):
    expert-parallel sizes of a mixture-of-experts model; TP then need not equal the ranks. MoE
    and MLA models are built by :func:`build_moe_gpt_model`.
``save-random``
    ``{hf_config, tp, out_dir, logits_out, input_ids, seed, pad_vocab_to_multiple?}``: build the
    GPTModel, redraw every parameter (norms and biases included), save it with
    ``dist_checkpointing.save`` to ``out_dir``, run the forward; rank 0 saves logits.
``save-rank-files``
    ``{hf_config, layout, pad_vocab_to_multiple?, seed, out_dir, logits_out, input_ids}``: build
    the GPTModel chunks of this rank at ``layout`` (``{tp, pp, vpp, first_stage_layers?}``),
    redraw every parameter, save the chunks' ``state_dict()`` in verl's legacy layout
    (``out_dir/verl/model/mp_rank_*/model.pt``) and Megatron-LM's
    (``out_dir/megatron/iter_0000007/mp_rank_*/model_optim_rng.pt`` with args, optimizer and
    RNG state, plus the tracker), run the (pipelined) forward; the last stage saves logits.
``load-rank-files``
    ``{hf_config, layout, pad_vocab_to_multiple?, ckpt, format, out, input_ids}``: build this
    rank's chunks, ``load_state_dict(strict=True)`` the rank file ckpt-ir wrote in ``format``
    (``verl-legacy`` / ``megatron-legacy``) into them, run the forward; the last stage saves
    logits.
``manager-save`` / ``manager-load`` / ``manager-kill-loop``
    Saves and loads through :class:`ckpt_ir.manager.CheckpointManager` from these ranks (see
    ``tests/clients/manager_jobs.py``).
``lora-load-forward`` / ``lora-save-random``
    Megatron-Bridge LoRA on the GPTModel (``tests/clients/mcore_lora.py``).
``verl-save`` / ``verl-load``
    verl 0.9.1's dist-only saves, its critic (value head) and legacy files: see
    ``tests/clients/verl_jobs.py``.
``batch``
    A list of ``{"command": ..., **args}``: several jobs in one process start (~5 s each saved).
    Jobs may use different layouts: model parallelism is re-initialised between them.

``<json-args>`` of ``load-forward`` / ``save-random`` may also be a list of jobs. A job that
raises writes ``<out>.rank<r>.err`` (its traceback) and the worker goes on with the next job,
so one broken architecture does not hide the others; :func:`job_result` reads either file.

The CPU shims (see /work/shared/reference/measured-here.md) are installed by :func:`main` only,
inside the worker processes, never in the test process and never in ``ckpt_ir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["REPO_ROOT", "HarnessError", "free_port", "job_result", "launch", "main"]


# --------------------------------------------------------------------------- test-process side


class HarnessError(AssertionError):
    """A rank failed, hung or left no result; the message carries each rank's stderr tail."""


def free_port() -> int:
    """A TCP port the OS reports free right now (bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, limit: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-limit:]


_PORT_TAKEN = ("address already in use", "eaddrinuse")


def port_taken(output: str) -> bool:
    """Whether a launch failed only because its rendezvous port was taken (and may be retried
    on a fresh one)."""
    return any(m in output.lower() for m in _PORT_TAKEN)


def launch(command: str, args: Any, *, world_size: int, timeout: float = 240.0,
           attempts: int = 3, module: str = "tests.clients.mcore_harness",
           env: dict[str, str] | None = None) -> None:
    """Run ``python -m module command args`` on ``world_size`` gloo ranks; raise
    :class:`HarnessError` (with every rank's output tail) if one fails or the run hangs.

    The port from :func:`free_port` can be taken by someone else before rank 0 binds it; such a
    launch is retried on a fresh port. The other client harnesses (verl's FSDP manager, FSDP2
    jobs) launch their ranks through this too, with their own ``module`` and ``env``.
    """
    for attempt in range(attempts):
        try:
            _launch_once(command, args, world_size=world_size, timeout=timeout, module=module,
                         extra_env=env or {})
            return
        except HarnessError as e:
            if attempt + 1 == attempts or not port_taken(str(e)):
                raise


def _launch_once(command: str, args: Any, *, world_size: int, timeout: float, module: str,
                 extra_env: dict[str, str]) -> None:
    port = free_port()
    payload = json.dumps(args)
    with tempfile.TemporaryDirectory(prefix="client-ranks-") as logdir:
        procs: list[tuple[subprocess.Popen, Path]] = []
        for rank in range(world_size):
            env = {
                **os.environ,
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                # One intra-op thread per rank: the ranks share a couple of cores.
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
                **extra_env,
            }
            err = Path(logdir) / f"rank{rank}.log"
            with err.open("wb") as fh:
                proc = subprocess.Popen([sys.executable, "-m", module, command, payload],
                                        cwd=REPO_ROOT, env=env, stdout=fh,
                                        stderr=subprocess.STDOUT)
            procs.append((proc, err))
        deadline = time.monotonic() + timeout
        failed: list[str] = []
        try:
            # Poll all ranks: one that dies leaves the others blocked in a collective.
            while not failed and any(p.poll() is None for p, _ in procs):
                failed = [f"rank {r} exited {p.returncode}"
                          for r, (p, _) in enumerate(procs) if p.returncode not in (None, 0)]
                if time.monotonic() > deadline:
                    failed.append(f"timed out after {timeout:.0f}s")
                time.sleep(0.05)
            failed = failed or [f"rank {r} exited {p.returncode}"
                                for r, (p, _) in enumerate(procs) if p.returncode != 0]
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if failed:
            tails = "\n".join(f"----- rank {r} output (tail) -----\n{_tail(log)}"
                              for r, (_, log) in enumerate(procs))
            raise HarnessError(f"{module} {command} (world_size={world_size}): "
                               f"{'; '.join(failed)}\n{tails}")


def job_result(out: str | Path) -> torch.Tensor:
    """The tensor a job saved at ``out``, or :class:`HarnessError` with the ranks' tracebacks."""
    out = Path(out)
    if out.exists():
        return torch.load(out, weights_only=True)
    errors = sorted(out.parent.glob(out.name + ".rank*.err"))
    detail = "\n".join(f"----- {e.name} -----\n{_tail(e)}" for e in errors) or "(no error file)"
    raise HarnessError(f"job left no result at {out}\n{detail}")


# --------------------------------------------------------------------------- worker side


def install_cpu_shims() -> None:
    """Let megatron-core 0.16.1 run on a CPU-only torch build (worker processes only)."""
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    if not torch.cuda.is_available():
        # With tied embeddings and PP > 1, LanguageModule.setup_embeddings_and_output_layer
        # does `weight.data = weight.data.cuda()` before all-reducing the last stage's copy:
        # "AssertionError: Torch not compiled with CUDA enabled" on a CPU-only build.
        torch.Tensor.cuda = lambda self, *a, **k: self
    with contextlib.suppress(ImportError):
        # Without TE, 0.16.1's MLA gets TELinear as a MagicMock stand-in and then runs
        # isinstance(linear_proj, TELinear): a class that matches nothing keeps that False.
        from megatron.core.transformer import multi_latent_attention as mla

        if not isinstance(mla.TELinear, type):
            mla.TELinear = mla.TEColumnParallelLinear = type("NoTransformerEngine", (), {})
    with contextlib.suppress(ImportError):
        # Sliding-window layers (gpt-oss) build their mask with device="cuda" in
        # megatron/core/transformer/utils.py; the same mask on the CPU.
        from megatron.core.fusions import fused_softmax

        def sliding_window_causal_mask(sq, skv, window_size):
            allowed = torch.triu(torch.ones(sq, skv, dtype=torch.bool),
                                 diagonal=skv - sq - window_size[0])
            return ~torch.tril(allowed, diagonal=skv - sq + window_size[1])

        fused_softmax.get_sliding_window_causal_mask = sliding_window_causal_mask
    with contextlib.suppress(ImportError):
        # 0.16.1 calls te_general_gemm in the MoE router whenever the name exists.
        from megatron.core.transformer.moe import moe_utils

        moe_utils.te_general_gemm = None


def _init_distributed() -> tuple[int, int]:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A short timeout turns a rank that died mid-collective into an error, not a hang.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    # model_parallel_cuda_manual_seed needs CUDA; the inference tracker forks no CUDA RNG.
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return rank, world


def build_gpt_model(hf_config: str | Path, tp: int, pad_vocab_to_multiple: int | None = None,
                    *, ep: int = 1, etp: int | None = None):
    """A GPTModel for an HF ``config.json`` built only from ckpt-ir's public ``megatron_args``."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ckpt_ir.megatron_config import megatron_args

    hf = json.loads(Path(hf_config).read_text())
    args = megatron_args(hf, pad_vocab_to_multiple=pad_vocab_to_multiple)
    if args.config_class != "TransformerConfig" or "num_moe_experts" in args.transformer_config:
        return build_moe_gpt_model(args, tp, ep=ep, etp=etp)
    config = TransformerConfig(
        **args.transformer_config, activation_func=F.silu, tensor_model_parallel_size=tp,
        use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    model = GPTModel(config=config,
                     transformer_layer_spec=get_gpt_layer_local_spec(**args.layer_spec),
                     **args.gpt_model, parallel_output=False)
    return model.eval()


class MlaCoreAttention(torch.nn.Module):
    """Unfused causal attention whose key and value head sizes differ (test-only).

    megatron-core 0.16.1's local ``DotProductAttention`` takes no ``k_channels`` /
    ``v_channels``, so a local-spec MLA layer cannot be built; TE's attention, which MLA uses on
    GPUs, needs CUDA. This is softmax(q k^T * scale) v over [seq, batch, heads, dim] inputs with
    MLA's softmax scale, masked by the boolean causal mask :func:`gpt_forward` passes.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.config = config
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        scores = scores.masked_fill(attention_mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)  # [b, n, s, dv]
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _with_mla_core_attention(spec):
    """A copy of a layer spec whose MLA core attention is :class:`MlaCoreAttention`."""
    import copy

    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = MlaCoreAttention
    return spec


def _activation(name: str):
    """The activation function ``MegatronModelArgs.activation`` names."""
    import torch.nn.functional as F
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    return {"silu": F.silu, "quick_gelu": quick_gelu}[name]


def build_moe_gpt_model(args, tp: int, *, ep: int = 1, etp: int | None = None):
    """A MoE and/or MLA GPTModel from :class:`~ckpt_ir.megatron_config.MegatronModelArgs`:
    SequentialMLP experts (``moe_grouped_gemm=False``), no auxiliary loss, the decoder block
    spec when layers differ, the MTP block when there are MTP layers, and
    :class:`MlaCoreAttention` for MLA (CPU only)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.transformer import transformer_config

    config_class = getattr(transformer_config, args.config_class)
    moe = {"moe_grouped_gemm": False, "moe_aux_loss_coeff": 0.0,
           "expert_model_parallel_size": ep, "expert_tensor_parallel_size": etp or tp} \
        if "num_moe_experts" in args.transformer_config else {}
    config = config_class(
        **args.transformer_config, **moe, activation_func=_activation(args.activation),
        tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    # Read with getattr by megatron-core, not TransformerConfig fields (gpt-oss's YaRN).
    for name, value in args.config_attributes.items():
        setattr(config, name, value)
    mla = args.config_class == "MLATransformerConfig"
    if args.decoder_block_spec:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization="RMSNorm")
        if mla:
            spec.layer_specs = [_with_mla_core_attention(s) for s in spec.layer_specs]
    else:
        spec = get_gpt_layer_local_spec(**args.layer_spec)
        if mla:
            spec = _with_mla_core_attention(spec)
    mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False) if args.mtp \
        else None
    model = GPTModel(config=config, transformer_layer_spec=spec, **args.gpt_model,
                     parallel_output=False, mtp_block_spec=mtp)
    return model.eval()


@torch.no_grad()
def gpt_forward(model, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Gathered logits [batch, seq, vocab] with explicit positions and a boolean causal mask."""
    input_ids = torch.tensor(ids, dtype=torch.long)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(batch, seq)
    # True = masked out; the fused/flash paths that build it implicitly need CUDA.
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    mtp = getattr(model, "mtp_process", False)
    if not mtp:
        return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask).float()
    # 0.16.1 runs MTP layers only to compute their loss from labels; the main logits (what HF
    # computes: transformers has no MTP layers) come from the model without them.
    layers, model.mtp_process, model.config.mtp_num_layers = model.config.mtp_num_layers, \
        False, None
    try:
        return model(input_ids=input_ids, position_ids=position_ids,
                     attention_mask=mask).float()
    finally:
        model.mtp_process, model.config.mtp_num_layers = True, layers


def set_parallel(tp: int, pp: int = 1, vpp: int = 1, *, ep: int = 1,
                 etp: int | None = None) -> None:
    """(Re)initialise megatron-core's model-parallel groups for one job's layout."""
    from megatron.core import parallel_state, tensor_parallel

    current = (parallel_state.get_tensor_model_parallel_world_size(),
               parallel_state.get_pipeline_model_parallel_world_size(),
               parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
               parallel_state.get_expert_model_parallel_world_size(),
               parallel_state.get_expert_tensor_parallel_world_size()) \
        if parallel_state.model_parallel_is_initialized() else None
    if current == (tp, pp, vpp, ep, etp or tp):
        return
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def _save_rank0(obj: Any, path: str | Path, rank: int) -> None:
    if rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)


def load_forward(job: Mapping[str, Any], rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing

    _check_tp(job, world)
    set_parallel(int(job["tp"]), ep=int(job.get("ep", 1)), etp=job.get("etp"))
    model = build_gpt_model(job["hf_config"], job["tp"], job.get("pad_vocab_to_multiple"),
                            ep=int(job.get("ep", 1)), etp=job.get("etp"))
    strict = job.get("strict", "assume_ok_unexpected")
    allow_missing = set(job.get("allow_missing") or ())
    if strict != "raise_all" or not allow_missing:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(job["ckpt"]),
                                         strict=strict)
    else:
        # raise_all with named exceptions: megatron's "missing" = in the checkpoint but not
        # requested by the model; "unexpected" = requested but absent from the checkpoint.
        loaded, missing, unexpected = dist_checkpointing.load(
            model.sharded_state_dict(), str(job["ckpt"]), strict="return_all")
        if unexpected or set(missing) - allow_missing:
            raise RuntimeError(f"raise_all (allowing missing {sorted(allow_missing)}) failed: "
                               f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.load_state_dict(loaded)
    _save_rank0(gpt_forward(model, job["input_ids"]), job["out"], rank)


@torch.no_grad()
def randomize_megatron_(model, seed: int, tp_rank: int) -> None:
    """Redraw every parameter: replicated ones identically on all ranks, TP shards per rank.

    Same distributions as ``hf_models.randomize_``. Each TP shard gets its own draw so that,
    say, the two KV groups of a TP=2 ``linear_qkv`` differ and a group swap would show.
    """
    for name, p in model.named_parameters():
        split = bool(getattr(p, "tensor_model_parallel", False))
        key = zlib.crc32(name.encode()) ^ (seed * 1_000_003) ^ ((tp_rank + 1) * 7919 if split
                                                                  else 0)
        if getattr(p, "allreduce", True) is False:
            # Expert weights: local expert k of each EP rank is a different global expert.
            key ^= (_expert_rank() + 1) * 104_729
        gen = torch.Generator().manual_seed(key)
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.3 * noise)
        else:
            p.copy_(0.1 * noise)
    for name, b in model.named_buffers():
        if name.endswith("router.expert_bias"):
            # DeepSeek's routing bias is a buffer; a zero one would hide a dropped mapping.
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
            b.copy_(0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float32))


def _expert_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_rank()


def save_random(job: Mapping[str, Any], rank: int, world: int) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    _check_tp(job, world)
    set_parallel(int(job["tp"]), ep=int(job.get("ep", 1)), etp=job.get("etp"))
    torch.manual_seed(int(job["seed"]))
    model = build_gpt_model(job["hf_config"], job["tp"], job.get("pad_vocab_to_multiple"),
                            ep=int(job.get("ep", 1)), etp=job.get("etp"))
    randomize_megatron_(model, int(job["seed"]),
                        parallel_state.get_tensor_model_parallel_rank())
    out_dir = Path(job["out_dir"])
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(out_dir))
    dist.barrier()
    _save_rank0(gpt_forward(model, job["input_ids"]), job["logits_out"], rank)


def _check_tp(job: Mapping[str, Any], world: int) -> None:
    if "ep" in job:
        # Expert parallel: attention TP and expert EP x ETP must each tile the ranks.
        tp, ep = int(job["tp"]), int(job["ep"])
        if world % tp or world % (ep * int(job.get("etp") or tp)):
            raise ValueError(f"tp={tp}, ep={ep}, etp={job.get('etp')} do not tile {world} ranks")
        return
    if int(job["tp"]) != world:
        raise ValueError(f"job asks for tp={job['tp']} but the launch has {world} ranks")


# ---- per-rank files (verl legacy, Megatron-LM legacy) -----------------------------------------


def _layout(job: Mapping[str, Any], world: int) -> tuple[int, int, int, int | None, int | None]:
    layout = job["layout"]
    tp, pp, vpp = int(layout.get("tp", 1)), int(layout.get("pp", 1)), int(layout.get("vpp", 1))
    if tp * pp * _ep(job) != world:
        raise ValueError(f"layout {layout} needs {tp * pp * _ep(job)} ranks, the launch has "
                         f"{world}")
    return tp, pp, vpp, layout.get("first_stage_layers"), layout.get("last_stage_layers")


def _ep(job: Mapping[str, Any]) -> int:
    """A per-rank job's expert-parallel size: EP ranks are data-parallel ranks of the dense
    layers, so the launch has TP x PP x EP ranks (expert TP = TP)."""
    return int(job["layout"].get("ep", 1))


def build_gpt_chunks(job: Mapping[str, Any], world: int) -> list:
    """This rank's GPTModel chunks (one per virtual pipeline stage) at the job's layout."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ckpt_ir.megatron_config import megatron_args

    tp, pp, vpp, first, last = _layout(job, world)
    etp = job["layout"].get("etp")  # expert TP (None: TP); ETP=1 puts whole experts per rank
    set_parallel(tp, pp, vpp, ep=_ep(job), etp=etp)
    hf = json.loads(Path(job["hf_config"]).read_text())
    args = megatron_args(hf, pad_vocab_to_multiple=job.get("pad_vocab_to_multiple"))
    if args.config_class != "TransformerConfig" or "num_moe_experts" in args.transformer_config:
        if pp > 1:
            raise ValueError("the MoE / MLA per-rank jobs build one pipeline stage")
        return [build_moe_gpt_model(args, tp, ep=_ep(job), etp=etp)]
    config = TransformerConfig(
        **args.transformer_config, activation_func=F.silu, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=torch.float32, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    spec = get_gpt_layer_local_spec(**args.layer_spec)
    chunks = []
    for v in range(vpp):
        vp = v if vpp > 1 else None
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=spec, **args.gpt_model, parallel_output=False,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=vp),
            vp_stage=vp).eval())
    return chunks


@torch.no_grad()
def randomize_chunks_(chunks: list, seed: int, *, tied: bool) -> None:
    """:func:`randomize_megatron_` for pipeline chunks: each (stage, chunk) draws its own layers;
    a tied embedding and the last stage's output-layer copy of it draw the same values."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    for v, chunk in enumerate(chunks):
        for name, p in chunk.named_parameters():
            split = bool(getattr(p, "tensor_model_parallel", False))
            where = "tied-embedding" if tied and name in (
                "embedding.word_embeddings.weight", "output_layer.weight") \
                else f"{pp_rank}.{v}.{name}"
            key = zlib.crc32(where.encode()) ^ (seed * 1_000_003) ^ (
                (tp_rank + 1) * 7919 if split else 0)
            if getattr(p, "allreduce", True) is False:
                # Expert weights: local expert k of each EP rank is a different global expert.
                key ^= (_expert_rank() + 1) * 104_729
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(key))
            if "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.1 * noise)
        for name, b in chunk.named_buffers():
            if name.endswith("router.expert_bias"):
                gen = torch.Generator().manual_seed(zlib.crc32(f"{pp_rank}.{v}.{name}".encode())
                                                    ^ seed)
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


@torch.no_grad()
def pipeline_forward(chunks: list, ids: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """Logits of the whole model, chunk by chunk in pipeline order; None except on the rank
    holding the last chunk. Hidden states travel by broadcast in the pipeline group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if len(chunks) == 1 and getattr(chunks[0], "mtp_process", False):
        return gpt_forward(chunks[0], ids)  # one stage with MTP layers (see gpt_forward)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    group = parallel_state.get_pipeline_model_parallel_group()
    input_ids = torch.tensor(ids, dtype=torch.long)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    hidden = None
    out = None
    for v in range(len(chunks)):
        for p in range(pp):
            if p == pp_rank:
                chunk = chunks[v]
                if hidden is not None:
                    chunk.set_input_tensor(hidden)
                out = chunk(input_ids=input_ids, position_ids=position_ids,
                            attention_mask=mask)
            if v == len(chunks) - 1 and p == pp - 1:
                return out.float() if p == pp_rank else None
            buf = out.contiguous() if p == pp_rank else torch.empty(
                seq, batch, chunks[0].config.hidden_size)
            dist.broadcast(buf, src=dist.get_global_rank(group, p), group=group)
            hidden = buf
    return None


def _rank_dir(tp: int, pp: int) -> str:
    from megatron.core import parallel_state

    name = f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}"
    if pp > 1:
        name += f"_{parallel_state.get_pipeline_model_parallel_rank():03d}"
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        name += f"_{parallel_state.get_expert_model_parallel_rank():03d}"
    return name


def megatron_lm_args(job: Mapping[str, Any], chunks: list) -> Any:
    """The args Namespace of a Megatron-LM run (the fields its checkpoints carry), including a
    megatron enum (ckpt-ir's restricted unpickler reads it as a stand-in)."""
    import argparse

    from megatron.core.transformer.enums import AttnBackend

    from ckpt_ir.megatron_config import megatron_args

    cfg = chunks[0].config
    layout = job["layout"]
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
        padded_vocab_size=chunks[0].vocab_size, vocab_size=None,
        untie_embeddings_and_output_weights=not chunks[0].share_embeddings_and_output_weights,
        add_qkv_bias=cfg.add_qkv_bias, qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm",
        norm_epsilon=cfg.layernorm_epsilon, swiglu=True, add_bias_linear=False,
        position_embedding_type="rope", max_position_embeddings=64,
        rotary_base=megatron_args(json.loads(Path(job["hf_config"]).read_text())
                                  ).gpt_model["rotary_base"],
        tensor_model_parallel_size=layout.get("tp", 1),
        pipeline_model_parallel_size=layout.get("pp", 1),
        virtual_pipeline_model_parallel_size=layout.get("vpp") if layout.get("vpp", 1) > 1
        else None,
        decoder_first_pipeline_num_layers=layout.get("first_stage_layers"),
        decoder_last_pipeline_num_layers=layout.get("last_stage_layers"),
        expert_model_parallel_size=layout.get("ep", 1), transformer_impl="local",
        params_dtype=torch.float32,
        attention_backend=AttnBackend.auto, bf16=False, fp16=False, ckpt_format="torch")


def save_rank_files(job: Mapping[str, Any], rank: int, world: int) -> None:
    import random

    import numpy as np
    import torch.distributed as dist

    tp, pp, vpp, _, _ = _layout(job, world)
    hf = json.loads(Path(job["hf_config"]).read_text())
    chunks = build_gpt_chunks(job, world)
    randomize_chunks_(chunks, int(job["seed"]), tied=bool(hf.get("tie_word_embeddings")))
    states = [c.state_dict() for c in chunks]
    out = Path(job["out_dir"])
    verl = out / "verl" / "model" / _rank_dir(tp, pp) / "model.pt"
    megatron = out / "megatron" / "iter_0000007" / _rank_dir(tp, pp) / "model_optim_rng.pt"
    for path in (verl, megatron):
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(states, verl)  # verl: torch.save([m.state_dict() for m in self.model])
    models = {"model": states[0]} if vpp == 1 else {f"model{i}": s for i, s in enumerate(states)}
    torch.save({
        "args": megatron_lm_args(job, chunks), "checkpoint_version": 3.0, "iteration": 7,
        **models,
        "optimizer": {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
                      "fp32_from_fp16_params": []},
        "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 7},
        "rng_state": [{"random_rng_state": random.getstate(),
                       "np_rng_state": np.random.get_state(),
                       "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}],
        "num_floating_point_operations_so_far": 0,
    }, megatron)
    dist.barrier()
    if rank == 0:
        hf_dir = out / "verl" / "hf_config_and_tokenizer"
        hf_dir.mkdir(parents=True, exist_ok=True)
        (hf_dir / "config.json").write_text(Path(job["hf_config"]).read_text())
        (out / "megatron" / "latest_checkpointed_iteration.txt").write_text("7")
    logits = pipeline_forward(chunks, job["input_ids"])
    if logits is not None and parallel_tp_rank() == 0 and _expert_rank() == 0:
        Path(job["logits_out"]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(logits, job["logits_out"])


def parallel_tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def load_rank_files(job: Mapping[str, Any], rank: int, world: int) -> None:
    import argparse

    tp, pp, vpp, _, _ = _layout(job, world)
    chunks = build_gpt_chunks(job, world)
    ckpt = Path(job["ckpt"])
    if job["format"] == "verl-legacy":
        states = torch.load(ckpt / "model" / _rank_dir(tp, pp) / "model.pt", weights_only=True)
    else:
        path = ckpt / "release" / _rank_dir(tp, pp) / "model_optim_rng.pt"
        with torch.serialization.safe_globals([argparse.Namespace]):
            saved = torch.load(path, weights_only=True)
        states = [saved["model"]] if vpp == 1 else [saved[f"model{i}"] for i in range(vpp)]
    if len(states) != len(chunks):
        raise RuntimeError(f"{len(states)} state dicts for {len(chunks)} chunks")
    for chunk, state in zip(chunks, states, strict=True):
        chunk.load_state_dict(state, strict=True)
    logits = pipeline_forward(chunks, job["input_ids"])
    if logits is not None and parallel_tp_rank() == 0 and _expert_rank() == 0:
        Path(job["out"]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(logits, job["out"])


def lora_load_forward(job: Mapping[str, Any], rank: int, world: int) -> None:
    """Megatron-Bridge LoRA on the GPTModel: see tests/clients/mcore_lora.py."""
    from tests.clients.mcore_lora import lora_load_forward as run

    run(job, rank, world)


def lora_save_random(job: Mapping[str, Any], rank: int, world: int) -> None:
    """A LoRA training save (adapters only) from megatron-core: see tests/clients/mcore_lora.py."""
    from tests.clients.mcore_lora import lora_save_random as run

    run(job, rank, world)


_COMMANDS = {"load-forward": load_forward, "save-random": save_random,
             "save-rank-files": save_rank_files, "load-rank-files": load_rank_files,
             "lora-load-forward": lora_load_forward, "lora-save-random": lora_save_random}


def _manager_command(name: str) -> Any:
    """A checkpoint-manager job (``tests/clients/manager_jobs.py``, imported when run)."""

    def run(job: Mapping[str, Any], rank: int, world: int) -> None:
        from tests.clients.manager_jobs import COMMANDS

        COMMANDS[name](job, rank, world)

    return run


_COMMANDS.update({n: _manager_command(n)
                  for n in ("manager-save", "manager-load", "manager-kill-loop")})


def _verl_command(name: str) -> Any:
    """A verl tree job (``tests/clients/verl_jobs.py``, imported when run)."""

    def run(job: Mapping[str, Any], rank: int, world: int) -> None:
        from tests.clients.verl_jobs import COMMANDS

        COMMANDS[name](job, rank, world)

    return run


_COMMANDS.update({n: _verl_command(n) for n in ("verl-save", "verl-load")})


def _jobs(command: str, args: Any) -> list[tuple[str, Mapping[str, Any]]]:
    items = args if isinstance(args, list) else [args]
    if command == "batch":
        return [(item["command"], item) for item in items]
    return [(item.get("command", command), item) for item in items]


def main(argv: Sequence[str]) -> int:
    install_cpu_shims()
    command, args = argv[0], json.loads(argv[1])
    if command not in (*_COMMANDS, "batch"):
        raise SystemExit(f"unknown command {command!r}; expected one of "
                         f"{', '.join((*_COMMANDS, 'batch'))}")
    import torch.distributed as dist

    rank, world = _init_distributed()
    for name, job in _jobs(command, args):
        result = job.get("out") or job.get("logits_out")
        try:
            _COMMANDS[name](job, rank, world)
        except Exception:
            tb = traceback.format_exc()
            print(f"[rank {rank}] job {name} {result} failed:\n{tb}", file=sys.stderr)
            if result:
                err = Path(f"{result}.rank{rank}.err")
                err.parent.mkdir(parents=True, exist_ok=True)
                err.write_text(tb)
    dist.barrier()
    dist.destroy_process_group()
    # Failed jobs are reported through their .err files; the launch itself succeeded.
    return 0


def _vl_command(name: str) -> Any:
    """A Qwen VL job (``tests/clients/qwen_vl_jobs.py``, imported when run)."""

    def run(job: Mapping[str, Any], rank: int, world: int) -> None:
        from tests.clients.qwen_vl_jobs import COMMANDS

        COMMANDS[name](job, rank, world)

    return run


_COMMANDS.update({n: _vl_command(n) for n in ("vl-load-forward",)})


def _mfsdp_command(name: str) -> Any:
    """A Megatron-FSDP job (``tests/clients/mfsdp_jobs.py``, imported when run)."""

    def run(job: Mapping[str, Any], rank: int, world: int) -> None:
        from tests.clients.mfsdp_jobs import COMMANDS

        COMMANDS[name](job, rank, world)

    return run


_COMMANDS.update({n: _mfsdp_command(n) for n in ("mfsdp-save",)})


if __name__ == "__main__":  # dist_checkpointing.save spawns processes that re-import __main__
    sys.exit(main(sys.argv[1:]))
