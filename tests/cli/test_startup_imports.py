"""What a ckpt-ir process imports: nothing heavy where no tensor is touched (issues #17, #20).

``import torch`` alone is 1.3-1.7 s on this machine kind, most of a small command's time, so
``ckpt-ir --help`` and argument errors must not pay it; a conversion imports only its path's
modules. Each case runs the real CLI entry point in a fresh interpreter and reports the modules
it left in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_ir
from tests.fixtures import write_hf

# Runs ckpt_ir.cli.main(argv) as the console script does, then prints the exit code and
# which of the watched modules were imported.
_PROBE = """
import json, sys
if sys.argv[2:] == ["--with-torch"]:
    import torch
from ckpt_ir.cli import main
argv = json.loads(sys.argv[1])
try:
    code = main(argv)
except SystemExit as e:
    code = e.code
watched = ("torch", "numpy", "transformers", "peft", "megatron", "safetensors", "tqdm",
           "torch.distributed.checkpoint", "yaml")
print(json.dumps({"code": code, "imported": [m for m in watched if m in sys.modules]}))
"""


def _run_probe(argv: list[str], *, with_torch: bool = False) -> tuple[str, dict]:
    """What the command printed, and the probe's report."""
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv),
                          *(["--with-torch"] if with_torch else [])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    printed, _, report = out.stdout.strip().rpartition("\n")
    return printed, json.loads(report)


def _probe(argv: list[str]) -> dict:
    return _run_probe(argv)[1]


@pytest.mark.parametrize(("argv", "code"), [
    (["--help"], 0),
    (["convert", "--help"], 0),
    (["inspect", "--help"], 0),
    ([], 2),                                       # no command
    (["frobnicate"], 2),                           # unknown command
    (["convert", "only-a-source"], 2),             # missing arguments
    (["convert", "a", "b", "--to", "nonsense"], 2),  # bad choice
])
def test_help_and_argument_errors_import_no_torch(argv: list[str], code: int) -> None:
    got = _probe(argv)
    assert got == {"code": code, "imported": []}, (argv, got)


def test_hf_to_mcore_dist_conversion_imports_only_its_path(tmp_path: Path) -> None:
    # torch, yes (tensors are touched); not transformers, peft, megatron-core, the safetensors
    # package (ckpt-ir reads and writes the format itself), torch DCP or YAML (only a
    # Megatron-Bridge run_config.yaml needs it). (torch itself imports numpy and tqdm.)
    src = tmp_path / "hf"
    write_hf(src)
    got = _probe(["convert", str(src), str(tmp_path / "dist"), "--to", "mcore-dist",
                  "--no-progress"])
    assert got["code"] == 0
    assert {"torch"} <= set(got["imported"])
    assert not {"transformers", "peft", "megatron", "safetensors", "yaml",
                "torch.distributed.checkpoint"} & set(got["imported"]), got


def _inspect_without_torch(src: Path) -> dict:
    """``inspect`` of ``src``, as JSON and as text: it imports no torch and prints what a
    process with torch imported prints. Returns the JSON report."""
    for argv in (["inspect", str(src), "--json"], ["inspect", str(src)]):
        printed, got = _run_probe(argv)
        assert got == {"code": 0, "imported": []}, (argv, got)
        with_torch, report = _run_probe(argv, with_torch=True)
        assert report["code"] == 0 and "torch" in report["imported"]
        assert printed == with_torch, argv
    return json.loads(_run_probe(["inspect", str(src), "--json"])[0])


def test_inspect_of_an_hf_directory_imports_no_torch(tmp_path: Path) -> None:
    # Metadata only: the safetensors header, the config, the plan (ckpt_ir.dtypes, not torch
    # dtypes). What it prints is what it prints with torch imported (the path that reads
    # tensors), JSON and text alike.
    src = tmp_path / "hf"
    write_hf(src)
    info = _inspect_without_torch(src)
    assert (info["format"], info["dtypes"], info["ir_tensors"]) == ("hf", ["bfloat16"], 21), info


@pytest.mark.parametrize(("to", "options"), [
    ("mcore-dist", {}),
    ("megatron-legacy", {"layout": {"tp": 2}, "pad_vocab_to_multiple": 8}),
    ("verl-legacy", {"layout": {"tp": 2}, "pad_vocab_to_multiple": 8}),
])
def test_inspect_of_pickled_formats_imports_no_torch(tmp_path: Path, to: str,
                                                     options: dict) -> None:
    # mcore-dist: .metadata read in the unpickler's metadata mode (torch.Size -> tuple,
    # torch.bfloat16 -> DType); common.pt is not opened when hf_config/ has the config.
    # Per-rank: the rank files' tensors read as records (shape, stride, DType), no tensor built.
    write_hf(tmp_path / "hf")
    src = tmp_path / to
    ckpt_ir.convert(tmp_path / "hf", src, to, **options)
    info = _inspect_without_torch(src)
    assert (info["format"], info["dtypes"], info["ir_tensors"]) == (to, ["bfloat16"], 21), info
