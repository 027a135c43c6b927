"""``ckpt-ir convert SRC DST --to FMT``: plan, validate, stream, commit atomically."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from ckpt_ir.commands import (
    add_common,
    add_layout_options,
    human_bytes,
    layout_fields,
    print_dropped,
)
from ckpt_ir.commands.extract_adapter import add_lora_options, lora_options, show_adapter
from ckpt_ir.errors import FormatError
from ckpt_ir.formats import FORMAT_NAMES, WRITABLE_FORMATS

NAME = "convert"
HELP = "convert a checkpoint into another format"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=WRITABLE_FORMATS)
    p.add_argument("--from", dest="source_format",
                   choices=FORMAT_NAMES,
                   help="source format (default: detected)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="cast floating-point weights (default: keep the source dtypes)")
    p.add_argument("--pad-vocab-to-multiple", type=int, metavar="N",
                   help="pad the vocabulary with zero rows to a multiple of N (mcore-dist, "
                        "per-rank formats; 1 removes a per-rank source's padding)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard when writing hf (default 5GB)")
    p.add_argument("--mcore-spec", choices=("any", "local", "te"), default="any",
                   help="Megatron layer spec to write for: mcore-dist writes its _extra_state "
                        "objects (any: both specs'); per-rank formats write its norm names and "
                        "_extra_state keys (any: the source's spec, TE for non-Megatron sources)")
    p.add_argument("--hf-experts", choices=("per-expert", "fused"), default="per-expert",
                   help="MoE experts when writing hf: one tensor per expert as transformers "
                        "saves them (default), or transformers 5's fused gate_up_proj/down_proj")
    p.add_argument("--mcore-experts", choices=("sequential", "grouped"),
                   help="MoE experts in per-rank files: SequentialMLP local_experts.K names or "
                        "TEGroupedMLP weightK names (default: grouped for the TE spec, "
                        "sequential for the local spec)")
    p.add_argument("--quantize", choices=("fp8",),
                   help="with --to hf: write linear weights as block FP8 e4m3 with "
                        "weight_scale_inv, as DeepSeek / Qwen FP8 releases do")
    p.add_argument("--verl-tree", action="store_true",
                   help="with --to mcore-dist: write DST as a verl 0.9.1 role directory "
                        "(global_step_N/actor): model/dist_ckpt, model/huggingface config and "
                        "tokenizer, transformer_config.json, ckpt_contents.json")
    p.add_argument("--torchtitan", action="store_true",
                   help="with --to torch-dcp: write DST as a torchtitan checkpoint folder "
                        "(step-0/ with torchtitan's model FQNs; llama3, qwen3, qwen3 MoE, "
                        "deepseek_v3, gpt_oss)")
    p.add_argument("--world-size", type=int, metavar="N", dest="fsdp_world_size",
                   help="with --to verl-fsdp: write N model_world_size_N_rank_R.pt files, for "
                        "an FSDP job of N ranks (default 1)")
    add_run_options(p)
    add_layout_options(p, what="layout of a per-rank destination (verl-legacy, megatron-legacy)")
    add_lora_options(p)
    add_common(p)


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--dry-run", action="store_true", help="plan and print, write nothing")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal) and no progress lines (in a log)")
    p.add_argument("--workers", type=_positive, default=1, metavar="N",
                   help="processes writing the destination on this machine (default 1); "
                        "forked after planning, each writes whole files (under torchrun the "
                        "ranks are the workers)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {"verl_tree": True} if args.verl_tree else {}
    if args.fsdp_world_size is not None:
        if args.to != "verl-fsdp":
            raise FormatError(f"--world-size applies to --to verl-fsdp, not {args.to}")
        extra["fsdp_world_size"] = args.fsdp_world_size
    if args.torchtitan:
        extra["torchtitan"] = True
    if args.quantize:
        extra["quantize"] = args.quantize
    if args.workers > 1:
        # This process plans on metadata and forks before any tensor work of its own, so
        # its workers may share torch's threads (ckpt_ir.workers).
        from ckpt_ir.workers import fork_before_threads

        fork_before_threads()
    return convert_with_progress(args, to=args.to, source_format=args.source_format,
                                 max_shard_size=args.max_shard_size, hf_experts=args.hf_experts,
                                 mcore_experts=args.mcore_experts, **extra,
                                 **lora_options(args))


PROGRESS_SECONDS = 10.0
"""Interval of the progress lines written when stderr is not a terminal (CI logs, nohup);
``CKPT_IR_PROGRESS_SECONDS`` overrides it."""


class LogProgress:
    """A progress line on stderr at most every ``interval`` seconds: bytes done of the total,
    rate, ETA. For logs, where a redrawn bar is either noise or nothing."""

    def __init__(self, interval: float, stream=sys.stderr,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.stream, self.clock = interval, stream, clock
        self.started = self.last = clock()

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if now - self.last < self.interval:
            return
        self.last = now
        # One write per whole line: a signal that interrupts it leaves no half line in front
        # of the "interrupted" message.
        self.stream.write(self.line(done, total, now - self.started) + "\n")
        self.stream.flush()

    @staticmethod
    def line(done: int, total: int, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"{(total - done) / rate:.0f} s" if rate > 0 else "unknown"
        share = f" ({100 * done / total:.0f}%)" if total else ""
        return (f"ckpt-ir: converting: {human_bytes(done)} of {human_bytes(total)}{share}, "
                f"{human_bytes(int(rate))}/s, ETA {eta}")


def _progress_interval() -> float:
    text = os.environ.get("CKPT_IR_PROGRESS_SECONDS", "")
    try:
        value = float(text)
    except ValueError:
        return PROGRESS_SECONDS
    return value if value >= 0 else PROGRESS_SECONDS


def convert_with_progress(args: argparse.Namespace, **kwargs: Any) -> dict[str, Any]:
    """``ckpt_ir.convert`` with the common flags of ``args``; progress on stderr: a bar on a
    terminal, a line at most every 10 s otherwise, nothing with ``--no-progress``."""
    from ckpt_ir.api import convert

    bar = None
    progress = None
    if not args.no_progress and not args.dry_run:
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                       file=sys.stderr, desc="converting", leave=False)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
        else:
            progress = LogProgress(_progress_interval())
    try:
        report = convert(args.src, args.dst, hf_config=args.hf_config, dtype=args.dtype,
                         pad_vocab_to_multiple=args.pad_vocab_to_multiple,
                         overwrite=args.overwrite, dry_run=args.dry_run,
                         trust_pickles=args.trust_pickles, mcore_spec=args.mcore_spec,
                         progress=progress, layout=layout_fields(args) or None,
                         source_ep=args.source_ep, workers=args.workers, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    return report.to_dict()


def show(r: dict[str, Any]) -> None:
    if "adapter" in r:
        show_adapter(r)
        return
    verb = "would write" if r["dry_run"] else "wrote"
    dest = r["dest_format"] + (f", {r['dest_layout']}" if r.get("dest_layout") else "")
    print(f"{r['source']} ({r['source_format']}, {r['source_layout']}) -> {r['destination']} "
          f"({dest})")
    print(f"  {r['architecture']}: {verb} {r['tensors_written']} tensors, "
          f"{human_bytes(r['bytes_written'])} (read {human_bytes(r['bytes_read'])}); "
          f"peak unit {human_bytes(r['peak_bytes_estimate'])}; {r['seconds']:.2f} s")
    for note in r["notes"]:
        print(f"  note: {note}")
    print_dropped(r["dropped"])
