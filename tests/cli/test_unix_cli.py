"""``ckpt-ir`` as a Unix tool, run as a subprocess: paths, signals, pipes, errors, progress.

- The source is never written: destinations are compared with their parent chain resolved
  (``LINK/out``, ``sib/../SRC/out``).
- SIGTERM is handled like SIGINT: one line, the temporary directory removed, exit 143 (130 for
  SIGINT), start-up included; an interrupt after the rename says the destination was written.
- Destinations: an empty directory is accepted; ``--overwrite`` replaces a checkpoint or a
  symlink (never its target) and refuses a directory holding anything else, or a file.
- Carried tokenizer files are regular files inside the source tree; others are reported.
- A closed stdout ends the run quietly; argument errors are one line; plan errors are capped;
  progress lines appear in logs at most every ``CKPT_IR_PROGRESS_SECONDS``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_ir.commands.convert import LogProgress
from ckpt_ir.executor import TEMP_MARKER
from tests.fixtures import TINY_LLAMA, tree_bytes, write_hf

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "ckpt_ir"]
INTERRUPTED = "nothing was written (temporary files removed)"


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env={**ENV, **(env or {})}, timeout=120)


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def hidden(parent: Path) -> list[str]:
    """Entries a run may have left behind: temporary and trash names."""
    return sorted(p.name for p in parent.iterdir() if TEMP_MARKER in p.name)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unix") / "SRC"
    write_hf(path, extra_files={"tokenizer_config.json": "{}"})
    return path


@pytest.fixture(scope="module")
def many_units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hundreds of small tensors: a conversion of hundreds of units, each reported."""
    path = tmp_path_factory.mktemp("units") / "hf"
    write_hf(path, dict(TINY_LLAMA, num_hidden_layers=64))
    return path


# --------------------------------------------------------------------------------------------
# The source is never written


def test_destination_through_a_symlink_to_the_source_is_refused(src: Path,
                                                                tmp_path: Path) -> None:
    before = tree_bytes(src)
    (tmp_path / "LINK").symlink_to(src)
    r = run("convert", str(src), "LINK/out", "--to", "mcore-dist", cwd=tmp_path)
    assert r.returncode == 2
    assert lines(r.stderr) == [f"ckpt-ir: error: destination {src}/out overlaps the source "
                               f"{src}; ckpt-ir never writes into its source"]
    assert tree_bytes(src) == before and not (src / "out").exists()


def test_destination_through_dotdot_into_the_source_is_refused(src: Path,
                                                               tmp_path: Path) -> None:
    before = tree_bytes(src)
    dest = os.path.relpath(src, tmp_path).replace("SRC", "sib/../SRC") + "/out"
    r = run("convert", str(src), dest, "--to", "mcore-dist", cwd=tmp_path)
    assert r.returncode == 2 and "overlaps the source" in r.stderr, r.stderr
    assert tree_bytes(src) == before and not (src / "out").exists()
    assert not (tmp_path / "sib").exists() and not (src.parent / "sib").exists()


def test_a_symlink_loop_in_the_destination_is_one_line(src: Path, tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    r = run("convert", str(src), "a/out", "--to", "hf", cwd=tmp_path)
    assert r.returncode == 2
    # The cause's wording is Python's (3.11: RuntimeError "Symlink loop from ...").
    [line] = lines(r.stderr)
    assert line.startswith("ckpt-ir: error: cannot resolve the destination a/out: "), line


def test_overwriting_a_symlink_to_the_source_is_refused(src: Path, tmp_path: Path) -> None:
    before = tree_bytes(src)
    (tmp_path / "out").symlink_to(src)
    r = run("convert", str(src), str(tmp_path / "out"), "--to", "mcore-dist", "--overwrite")
    assert r.returncode == 2 and "overlaps the source" in r.stderr, r.stderr
    assert tree_bytes(src) == before and (tmp_path / "out").is_symlink()


# --------------------------------------------------------------------------------------------
# Destinations


def test_an_empty_destination_directory_is_accepted(src: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    r = run("convert", str(src), str(tmp_path / "out"), "--to", "mcore-dist")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "metadata.json").is_file() and hidden(tmp_path) == []


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(src: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        r = run("convert", str(src), str(out), "--to", "mcore-dist", *extra)
        assert r.returncode == 2
        assert lines(r.stderr) == [
            f"ckpt-ir: error: destination {out} holds files that are not a checkpoint ckpt-ir "
            "recognises (notes.txt); it replaces only a checkpoint or an empty directory: "
            "move them or choose another destination"]
        assert (out / "notes.txt").read_text() == "mine" and hidden(tmp_path) == []


def test_overwrite_refuses_a_file(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("mine")
    r = run("convert", str(src), str(out), "--to", "mcore-dist", "--overwrite")
    assert r.returncode == 2
    assert lines(r.stderr) == [f"ckpt-ir: error: destination {out} exists and is not a "
                               "directory; ckpt-ir replaces only a checkpoint directory or an "
                               "empty one"]
    assert out.read_text() == "mine" and hidden(tmp_path) == []


def test_overwrite_replaces_a_symlink_and_leaves_its_target(src: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    assert run("convert", str(src), str(target), "--to", "mcore-dist").returncode == 0
    before = tree_bytes(target)
    (tmp_path / "out").symlink_to(target)
    r = run("convert", str(src), str(tmp_path / "out"), "--to", "hf", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "config.json").is_file()
    assert tree_bytes(target) == before
    assert hidden(tmp_path) == []  # the replaced link is gone, not left as a temp entry


# --------------------------------------------------------------------------------------------
# Carried files


def test_carried_files_are_regular_files_inside_the_source(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    write_hf(hf)
    outside = tmp_path / "secret.txt"
    outside.write_text("not a tokenizer")
    (hf / "tokenizer.json").symlink_to(outside)
    os.mkfifo(hf / "vocab.json")  # opening it would block forever
    (hf / "sub").mkdir()
    (hf / "sub" / "merges.txt").write_text("merges")
    (hf / "merges.txt").symlink_to("sub/merges.txt")  # inside the tree: carried
    r = run("convert", str(hf), str(tmp_path / "out"), "--to", "mcore-dist", "--json")
    assert r.returncode == 0, r.stderr
    notes = json.loads(r.stdout)["notes"]
    assert f"not copied: {hf}/tokenizer.json: a symlink leading out of the checkpoint, to " \
           f"{outside}" in notes
    assert f"not copied: {hf}/vocab.json: not a regular file" in notes
    carried = tmp_path / "out" / "hf_config"
    assert sorted(p.name for p in carried.iterdir()) == ["config.json", "merges.txt"]
    assert not (carried / "merges.txt").is_symlink()
    assert (carried / "merges.txt").read_text() == "merges"


# --------------------------------------------------------------------------------------------
# Signals


def _spawn_blocked(src: Path, dest: Path) -> tuple[subprocess.Popen, int]:
    """A conversion writing a progress line per unit into a 4 KiB pipe nobody reads: it is
    blocked mid-conversion, deterministically, until the pipe is drained."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([*CLI, "convert", str(src), str(dest), "--to", "mcore-dist"],
                            env={**ENV, "CKPT_IR_PROGRESS_SECONDS": "0"},
                            stdout=subprocess.DEVNULL, stderr=write)
    os.close(write)
    deadline = time.monotonic() + 60
    while not hidden(dest.parent) or not _pipe_full(read):
        assert proc.poll() is None and time.monotonic() < deadline, "never blocked"
        time.sleep(0.05)
    return proc, read


def _pipe_full(fd: int) -> bool:
    buffered = bytearray(4)
    fcntl.ioctl(fd, 0x541B, buffered)  # FIONREAD
    return int.from_bytes(buffered, sys.byteorder) >= 4096 - 200


def _drain(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


@pytest.mark.parametrize("sig,code,name", [(signal.SIGTERM, 143, "SIGTERM"),
                                           (signal.SIGINT, 130, "SIGINT")])
def test_signal_mid_conversion_removes_the_temp_and_says_so(many_units: Path, tmp_path: Path,
                                                           sig: int, code: int,
                                                           name: str) -> None:
    dest = tmp_path / "out"
    proc, read = _spawn_blocked(many_units, dest)
    proc.send_signal(sig)
    stderr = _drain(read)
    assert proc.wait(timeout=60) == code
    assert lines(stderr)[-1] == f"ckpt-ir: interrupted by {name}; {INTERRUPTED}"
    assert all(line.startswith("ckpt-ir: converting: ") for line in lines(stderr)[:-1])
    assert not dest.exists() and hidden(tmp_path) == []


def test_sigint_during_start_up_is_one_line(src: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "convert", str(src), str(tmp_path / "out"), "--to", "hf"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while proc.poll() is None and "libtorch" not in maps.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # torch is being imported (or the run has begun)
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.fail("the conversion ended before the signal: nothing tested")
    assert proc.returncode == 130
    assert lines(stderr) == [f"ckpt-ir: interrupted by SIGINT; {INTERRUPTED}"]
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_interrupt_after_the_rename_says_the_destination_was_written(src: Path,
                                                                    tmp_path: Path) -> None:
    """A real SIGINT delivered right after the rename (from the fsync of the parent that
    follows it): the report must not claim the destination was not written."""
    dest = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from ckpt_ir import executor\n"
        "from ckpt_ir.cli import main\n"
        "real = executor.fsync_dir\n"
        "def fsync_dir(path):\n"
        "    real(path)\n"
        "    if executor.committed:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "executor.fsync_dir = fsync_dir\n"
        f"sys.exit(main(['convert', {str(src)!r}, {str(dest)!r}, '--to', 'mcore-dist']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 130
    assert lines(r.stderr) == [f"ckpt-ir: interrupted by SIGINT after {dest} was written"]
    assert (dest / "metadata.json").is_file() and hidden(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Pipes, argument errors, plan errors, progress


def test_a_closed_stdout_ends_quietly(src: Path) -> None:
    proc = subprocess.Popen([*CLI, "inspect", str(src), "--json"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head` that already exited
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
    assert stderr == ""


def test_shell_pipe_into_head_is_quiet(src: Path) -> None:
    r = subprocess.run(f"{sys.executable} -m ckpt_ir inspect {src} | head -n 1", shell=True,
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert lines(r.stdout) == [f"{src}: hf (hf model directory)"]


@pytest.mark.parametrize("args,message", [
    (("convert", "a", "b", "--to", "bogus"),
     "ckpt-ir: error: argument --to: invalid choice: 'bogus' (choose from 'hf', 'mcore-dist', "
     "'torch-dcp', 'verl-legacy', 'megatron-legacy', 'verl-fsdp', 'hf-peft') "
     "(see ckpt-ir convert --help)"),
    (("convert", "a", "b"),
     "ckpt-ir: error: the following arguments are required: --to (see ckpt-ir convert --help)"),
    (("convert", "a", "b", "--to", "hf", "--tp", "x"),
     "ckpt-ir: error: argument --tp: invalid int value: 'x' (see ckpt-ir convert --help)"),
    (("frobnicate",),
     "ckpt-ir: error: argument command: invalid choice: 'frobnicate' (choose from 'inspect', "
     "'convert', 'reshard', 'verify', 'extract-adapter', 'merge-adapter') (see ckpt-ir --help)"),
])
def test_argument_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    r = run(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert lines(r.stderr) == [message]


def test_plan_errors_state_the_problem_first_and_cap_the_list(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    write_hf(hf, dict(TINY_LLAMA, num_hidden_layers=8))
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, intermediate_size=48)))
    r = run("convert", str(hf), str(tmp_path / "out"), "--to", "mcore-dist")
    assert r.returncode == 2
    err = lines(r.stderr)
    assert err[0].startswith("ckpt-ir: error: source tensor ") and "more problem(s))" in err[0]
    total = int(err[0].rsplit("(and ", 1)[1].split()[0]) + 1
    assert total > 12
    assert len(err) == 12
    assert all(line.startswith("ckpt-ir:   also: ") for line in err[1:11])
    assert err[11] == f"ckpt-ir:   ... and {total - 11} more ({total} problems in all)"
    assert not (tmp_path / "out").exists()


def test_progress_lines_when_stderr_is_not_a_terminal(many_units: Path, tmp_path: Path) -> None:
    r = run("convert", str(many_units), str(tmp_path / "a"), "--to", "mcore-dist",
            env={"CKPT_IR_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    progress = lines(r.stderr)
    assert len(progress) > 100
    assert all(line.startswith("ckpt-ir: converting: ") and " of " in line and "/s, ETA " in line
               for line in progress)
    assert "(100%)" in progress[-1]
    # --no-progress silences them; at the default interval a short run prints none.
    r = run("convert", str(many_units), str(tmp_path / "b"), "--to", "mcore-dist",
            "--no-progress", env={"CKPT_IR_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0 and r.stderr == ""
    r = run("convert", str(many_units), str(tmp_path / "c"), "--to", "mcore-dist")
    assert r.returncode == 0 and r.stderr == ""


def test_progress_line_at_most_every_interval() -> None:
    now = [0.0]
    out: list[str] = []

    class Stream:
        def write(self, text: str) -> None:
            out.append(text)

        def flush(self) -> None:
            pass

    progress = LogProgress(10.0, Stream(), lambda: now[0])
    for t, done in ((1, 100), (9.9, 200), (10, 300), (15, 400), (20, 512)):
        now[0] = t
        progress(done * 1024 * 1024, 1024 * 1024 * 1024)
    assert out == [
        "ckpt-ir: converting: 300.0 MiB of 1.0 GiB (29%), 30.0 MiB/s, ETA 24 s\n",
        "ckpt-ir: converting: 512.0 MiB of 1.0 GiB (50%), 25.6 MiB/s, ETA 20 s\n"]
