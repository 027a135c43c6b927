"""Plan, without any weights, the conversion of very large models and size a multi-node run.

    python tools/scale_plan.py                 # print the table
    python tools/scale_plan.py --write-docs    # refresh the table in docs/scale.md
    python tools/scale_plan.py --estimate      # the multi-node time model (docs/scale.md)

For each model config (shapes only: a directory holding just config.json) it times
``ckpt_ir.convert(..., dry_run=True)`` in both directions' first leg (hf -> mcore-dist) and
partitions the plan over N workers the way ``torchrun -m ckpt_ir convert`` would, reporting
bytes per worker and the largest unit (the per-worker peak memory estimate).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ckpt_ir  # noqa: E402
from ckpt_ir.distributed import partition_units  # noqa: E402
from ckpt_ir.options import WriteOptions  # noqa: E402
from ckpt_ir.orchestration import open_reader, plan_conversion  # noqa: E402

LLAMA3_405B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
    "intermediate_size": 53248, "num_attention_heads": 128, "num_key_value_heads": 8,
    "head_dim": 128, "num_hidden_layers": 126, "vocab_size": 128256,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072,
    "hidden_act": "silu", "dtype": "bfloat16",
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192},
}

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_nextn_predict_layers": 1,
    "vocab_size": 129280, "tie_word_embeddings": False, "rms_norm_eps": 1e-06,
    "max_position_embeddings": 163840, "hidden_act": "silu", "dtype": "bfloat16",
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

MODELS = {"Llama-3.1-405B": LLAMA3_405B, "DeepSeek-V3-671B": DEEPSEEK_V3}
WORKERS = (1, 8, 64)
GIB = 2**30


def study(name: str, config: dict, to: str = "mcore-dist") -> dict | None:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / name
        src.mkdir()
        (src / "config.json").write_text(json.dumps(config))
        t0 = time.perf_counter()
        try:
            report = ckpt_ir.convert(src, Path(d) / "out", to=to, dry_run=True)
        except ckpt_ir.FormatError as e:
            print(f"{name}: not supported yet ({e})", file=sys.stderr)
            return None
        seconds = time.perf_counter() - t0
        reader, _ = open_reader(src, None)
        opts = WriteOptions()
        plan, writer_cls = plan_conversion(reader, to, opts)
        writer = writer_cls(Path(d), reader.config, opts)
        writer.begin(plan.dest_specs)
        per_worker = {}
        for n in WORKERS:
            shares = partition_units(plan, writer.file_of, n)
            loads = [sum(plan.units[i].bytes_written for i in s) for s in shares]
            per_worker[n] = max(loads)
        reader.close()
    return {"name": name, "tensors": report.tensors_written, "bytes": report.bytes_written,
            "units": len(plan.units), "peak": report.peak_bytes_estimate,
            "largest": max(s.nbytes for s in plan.dest_specs), "seconds": seconds,
            "per_worker": per_worker}


def table(rows: list[dict]) -> str:
    head = ("| model | tensors written | bytes | units | largest tensor | peak per worker "
            "(largest unit) | plan time | " + " | ".join(
                f"bytes/worker, {n} workers" for n in WORKERS) + " |")
    lines = [head, "|" + " --- |" * (7 + len(WORKERS))]
    for r in rows:
        cells = [r["name"], str(r["tensors"]), f"{r['bytes'] / GIB:.1f} GiB", str(r["units"]),
                 f"{r['largest'] / GIB:.2f} GiB", f"{r['peak'] / GIB:.2f} GiB",
                 f"{r['seconds']:.1f} s",
                 *(f"{r['per_worker'][n] / GIB:.1f} GiB" for n in WORKERS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The time model's inputs. Rates per process (one thread) from ``python tools/bench_scale.py
# --rates``: the copy on the 16-CPU H100 host, ckpt-ir's FP8 dequantization on the 2-core CI
# machine kind (2026-12-07; the 16-CPU host was not lent again after the rewrite); start-up
# and plan times measured as stated in docs/scale.md; the filesystem figures are assumptions a
# reader replaces with their own.
GB = 1e9
RATES = {"copy": 2.35 * GB, "dequant": 1.29 * GB}
START_S = 1.5 + 3.0       # import torch and ckpt-ir, plan a 671B model (2.7 s measured)
COMMIT_S = 8.0            # gather every rank's chunk records, pickle a 31k-entry .metadata, fsync
NODE_BW = 5 * GB          # what one node reads plus writes on the shared filesystem
FS_BW = 20 * GB           # the filesystem's aggregate bandwidth
CASES = {
    # name: (bytes read, bytes written, per-tensor CPU work in bytes of output, its rate)
    "DeepSeek-V3 671B, FP8 -> bf16 mcore-dist": (0.69e12, 1271.5 * GIB, 1271.5 * GIB, "dequant"),
    "Llama-3.1-405B, bf16 hf -> mcore-dist": (756.0 * GIB, 756.0 * GIB, 0, "copy"),
}


def estimate(shapes=((1, 1), (1, 16), (2, 16), (4, 16), (8, 16))) -> str:
    """Expected wall time of M nodes x N processes: start-up, then the slower of the
    filesystem (read + write bytes over min(aggregate, M x per-node bandwidth)) and the
    per-tensor CPU work spread over M x N single-threaded processes, then the commit."""
    lines = ["| conversion | " + " | ".join(f"{m} node x {n}" if m == 1 else f"{m} nodes x {n}"
                                          for m, n in shapes) + " |",
             "|" + " --- |" * (1 + len(shapes))]
    for name, (read, written, cpu, rate) in CASES.items():
        cells = []
        for m, procs in shapes:
            io = (read + written) / min(FS_BW, m * NODE_BW)
            work = cpu / (m * procs * RATES[rate])
            total = START_S + max(io, work) + COMMIT_S
            bound = "CPU" if work > io else "I/O"
            cells.append(f"{total:.0f} s ({bound}; {written / (m * procs) / GIB:.1f} GiB/rank)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--estimate", action="store_true",
                   help="print the multi-node time model's table (docs/scale.md)")
    args = p.parse_args()
    if args.estimate:
        text = estimate()
        print(text)
        if args.write_docs:
            _replace("estimate", text)
        return 0
    rows = [r for name, cfg in MODELS.items() if (r := study(name, cfg)) is not None]
    text = table(rows)
    print(text)
    if args.write_docs:
        _replace("scale", text)
    return 0


def _replace(tag: str, text: str) -> None:
    path = REPO / "docs" / "scale.md"
    doc = path.read_text()
    doc = re.sub(rf"<!-- {tag}:begin -->.*?<!-- {tag}:end -->",
                 lambda _: f"<!-- {tag}:begin -->\n{text}\n<!-- {tag}:end -->", doc, flags=re.S)
    path.write_text(doc)
    print(f"updated {path}")


if __name__ == "__main__":
    sys.exit(main())
