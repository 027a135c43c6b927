"""Confirm on a CUDA machine that ckpt-ir's torch_dist output loads in unpatched megatron-core.

Prepare here (CPU, any megatron-core-free environment with transformers):

    python tools/confirm_on_cuda.py prepare .gpucheck

writes, for llama / qwen2 / qwen3 tiny random models: the HF source, ckpt-ir's mcore-dist output
(unpadded and padded to 128), and the transformers fp32 logits. Then, on the GPU machine, with a
megatron-core wheel on PYTHONPATH and no shims of any kind:

    python tools/confirm_on_cuda.py check .gpucheck

builds each GPTModel (local spec) from `ckpt_ir.megatron_args`, loads the checkpoint with
`dist_checkpointing.load` under the default strictness, runs the forward on CUDA and compares
the logits with transformers'. Prints one line per case and exits 1 on any mismatch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.clients.hf_models, and ckpt_ir on the GPU machine

CASES = ("llama", "qwen2", "qwen3")
TOLERANCE = 1e-5


def prepare(out: Path) -> None:
    import ckpt_ir
    from tests.clients.hf_models import hf_logits, input_ids, make_hf_model

    out.mkdir(parents=True, exist_ok=True)
    ids = input_ids()
    torch.save(ids, out / "input_ids.pt")
    for arch in CASES:
        src = make_hf_model(arch, out / f"{arch}-hf")
        torch.save(hf_logits(src, ids), out / f"{arch}-logits.pt")
        ckpt_ir.convert(src, out / f"{arch}-dist", to="mcore-dist", overwrite=True)
        ckpt_ir.convert(src, out / f"{arch}-dist-pad128", to="mcore-dist",
                        pad_vocab_to_multiple=128, overwrite=True)
    print(f"prepared {out}")


def check(root: Path) -> int:
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.package_info import __version__ as mcore_version
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ckpt_ir.megatron_config import megatron_args

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    ids = torch.tensor(torch.load(root / "input_ids.pt")).cuda()
    failures = 0
    for arch in CASES:
        want = torch.load(root / f"{arch}-logits.pt")
        for variant, pad in (("dist", None), ("dist-pad128", 128)):
            ckpt = root / f"{arch}-{variant}"
            hf = json.loads((ckpt / "hf_config" / "config.json").read_text())
            args = megatron_args(hf, pad_vocab_to_multiple=pad)
            config = TransformerConfig(**args.transformer_config, activation_func=F.silu,
                                       params_dtype=torch.float32)
            model = GPTModel(config=config,
                             transformer_layer_spec=get_gpt_layer_local_spec(**args.layer_spec),
                             parallel_output=False, **args.gpt_model).cuda()
            state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt))
            model.load_state_dict(state)
            model.eval()
            seq = ids.shape[1]
            mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device="cuda"), 1)
            pos = torch.arange(seq, device="cuda").unsqueeze(0).expand_as(ids)
            with torch.no_grad():
                got = model(ids, pos, mask).float().cpu()[..., : want.shape[-1]]
            diff = (got - want).abs().max().item()
            ok = diff <= TOLERANCE
            failures += not ok
            print(f"megatron-core {mcore_version} cuda {arch:6s} {variant:12s} "
                  f"max|dlogits|={diff:.2e} {'OK' if ok else 'MISMATCH'}", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "check"):
        print(__doc__)
        return 2
    root = Path(sys.argv[2])
    if sys.argv[1] == "prepare":
        prepare(root)
        return 0
    return check(root)


if __name__ == "__main__":
    sys.exit(main())
