"""megatron-core jobs of the Qwen VL tests (run by ``mcore_harness`` in gloo worker processes).

``vl-load-forward``: the language model of a Qwen2.5-VL torch_dist checkpoint written by
ckpt-ir, as a megatron-core 0.16.1 GPTModel (local spec, ``position_embedding_type="mrope"``
from :func:`ckpt_ir.megatron_args`) loaded under Megatron-Bridge's ``language_model.`` prefix,
run on the decoder inputs transformers built (token embeddings with the image features
spliced in) and its 3-D mrope position ids; the logits go to ``job["out"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

PREFIX = "language_model."


def vl_load_forward(job: Mapping[str, Any], rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing

    from tests.clients.mcore_harness import build_gpt_model, set_parallel

    set_parallel(1)
    model = build_gpt_model(job["hf_config"], 1)
    # Megatron-Bridge's Qwen25VLModel holds the GPTModel as .language_model: its keys carry
    # the prefix. The default strictness fails on any key the model requests and the
    # checkpoint lacks; the vision tower's keys are the checkpoint's extra.
    loaded = dist_checkpointing.load(model.sharded_state_dict(prefix=PREFIX), str(job["ckpt"]),
                                     strict="assume_ok_unexpected")
    assert all(k.startswith(PREFIX) for k in loaded), sorted(loaded)[:3]
    model.load_state_dict({k.removeprefix(PREFIX): v for k, v in loaded.items()})
    out = {}
    with torch.no_grad():
        for name, case in torch.load(job["inputs"], weights_only=True).items():
            emb = case["inputs_embeds"]  # [batch, seq, hidden]
            seq = emb.shape[1]
            mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
            out[name] = model(input_ids=case["input_ids"], position_ids=case["position_ids"],
                              attention_mask=mask,
                              decoder_input=emb.transpose(0, 1).contiguous()).float()
    if rank == 0:
        torch.save(out, job["out"])


COMMANDS = {"vl-load-forward": vl_load_forward}
