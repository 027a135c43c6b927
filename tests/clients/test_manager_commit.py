"""The checkpoint manager's layouts, commit protocol, crash safety and memory, on gloo ranks.

The ranks (``manager_workers``) hold megatron-named TP shards of small HF models, cut by
ckpt-ir's table and :func:`ckpt_ir.layout.shard`, so a rank starts in about a second and the
job can be killed many times; real GPTModels are in ``test_manager_client.py``.

- Every layout (TP, PP, VPP, DP, TP×PP, tied embeddings, MQA with TP > KV groups): the
  ``hf_model`` output is the source model bit for bit, the ``model`` (torch_dist) output
  converts back to it bit for bit, and either loads into another layout's shards exactly.
- Commit protocol: after each commit (sync and async) the manifest is newer than every data
  file and the tracker newer than the manifest; the job SIGKILLed at each step of the commit,
  and at random moments of back-to-back async saves, leaves the previous checkpoint and
  tracker valid, ``load("latest")`` returns it, and a restarted job cleans up and goes on.
- Retention keeps ``keep_last`` committed steps and never the only one; a failed write
  commits nothing; usage errors are typed and leave nothing behind.
- Peak RSS of a rank while it writes ``hf_model`` stays within its shard plus one destination
  tensor.
"""

from __future__ import annotations

import errno
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from ckpt_ir.converters.hf import HfWriter
from ckpt_ir.errors import (
    CorruptCheckpointError,
    DestinationError,
    DestinationExistsError,
    FormatError,
    PlanError,
)
from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import ParallelLayout, shard
from ckpt_ir.manager import (
    MANIFEST,
    TRACKER,
    CheckpointManager,
    DiskLayout,
    RankCoords,
    committed_steps,
    latest_step,
)
from ckpt_ir.manager.live import row_segments, shard_geometry
from ckpt_ir.manager.sharded import finish_sharded, load_sharded, snapshot, write_sharded_rank
from ckpt_ir.tables import NativeParams, build_table
from tests.clients import hf_models
from tests.clients.manager_workers import (
    fake_chunks,
    kill_ranks,
    run_ranks,
    start_ranks,
    step_value,
)
from tests.clients.sharded_stubs import LocalNonpersistentObject, ShardedObject, ShardedTensor

pytestmark = pytest.mark.clients

PAD = 128
# (name, arch, layout on 4 ranks): the layouts the manager must cut and join.
SAVE_CASES = [
    ("llama-tp2-pp2", "llama", {"tp": 2, "pp": 2}),
    ("qwen2-tp2-dp2", "qwen2", {"tp": 2}),          # tied embeddings, biases, DP replicas
    # One KV group cut by TP=2 (megatron-core splits the interleaved rows, not whole groups);
    # one layer per virtual pipeline chunk.
    ("qwen3-tp2-pp2-vpp2", "qwen3", {"tp": 2, "pp": 2, "vpp": 2}),
]
LAYERS = 4


def _hf(tmp: Path, arch: str) -> Path:
    return hf_models.make_hf_model(arch, tmp, seed=len(arch), num_hidden_layers=LAYERS)


# Loads of the llama-tp2-pp2 checkpoint at other multi-rank layouts (4 ranks: PP=2 x VPP=2
# has DP=2; TP=4 has DP=1), run in the same job right after the saves.
LOAD_LAYOUTS = [({"pp": 2, "vpp": 2}, "model"), ({"tp": 4}, "hf_model")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each SAVE_CASES layout saved (step 3, model + hf_model + extra), then the first one
    loaded at LOAD_LAYOUTS, all in one 4-rank job (a start costs more than the work)."""
    root = tmp_path_factory.mktemp("manager_layouts")
    cases: dict[str, Any] = {}
    jobs = []
    for name, arch, layout in SAVE_CASES:
        hf = root / "src" / arch
        if not hf.exists():
            hf = _hf(root / "src", arch)
        cases[name] = {"hf": hf, "root": root / name, "layout": layout}
        jobs.append({"command": "save", "hf": str(hf), "root": str(root / name),
                     "layout": layout, "steps": [3], "contents": ["model", "hf_model", "extra"],
                     "pad": PAD, "max_shard_size": 40_000})
    first = cases[SAVE_CASES[0][0]]
    loads = [{"command": "load", "hf": str(first["hf"]), "root": str(first["root"]),
              "layout": layout, "pad": PAD, "expect_hf": str(first["hf"]),
              "expect_scale": step_value(3), "load_contents": [src, "extra"],
              "out": str(root / "loads" / f"{src}-{i}"), "extra": True}
             for i, (layout, src) in enumerate(LOAD_LAYOUTS)]
    run_ranks("save", jobs + loads, 4, root / "logs", timeout=240)
    cases["loads"] = loads
    return cases


def _unit(root: Path, step: int) -> Path:
    return root / f"global_step_{step}" / "actor"


@pytest.mark.parametrize("case", [c[0] for c in SAVE_CASES])
def test_hf_model_from_every_layout_is_the_source_bit_for_bit(saved: dict, case: str) -> None:
    c = saved[case]
    src = ckpt_ir.open(c["hf"])
    out = ckpt_ir.open(_unit(c["root"], 3) / "model" / "huggingface")
    assert set(out.tensors) == set(src.tensors)
    for n in src.tensors:
        assert torch.equal(out.read(n), src.read(n) * step_value(3)), n
    index = json.loads((_unit(c["root"], 3) / "model/huggingface/model.safetensors.index.json")
                       .read_text())
    assert len(set(index["weight_map"].values())) > 4  # many files, owned by several ranks


@pytest.mark.parametrize("case", [c[0] for c in SAVE_CASES])
def test_torch_dist_model_from_every_layout_converts_back_bit_for_bit(
        saved: dict, case: str, tmp_path: Path) -> None:
    c = saved[case]
    # The run root resolves through the tracker and the manifest, as any ckpt-ir input does.
    assert ckpt_ir.detect(c["root"]) == "mcore-dist"
    ckpt_ir.convert(c["root"], tmp_path / "hf", to="hf")
    src, back = ckpt_ir.open(c["hf"]), ckpt_ir.open(tmp_path / "hf")
    for n in src.tensors:
        assert torch.equal(back.read(n), src.read(n) * step_value(3)), n


def _load_in_process(c: dict, source: str, layout: ParallelLayout) -> None:
    """Load into TP=1 shards in this process (no torch.distributed) and compare exactly."""
    mgr = CheckpointManager(c["root"], hf_config=c["hf"], layout=layout)
    chunks = fake_chunks(c["hf"], layout, RankCoords(), pad_vocab_to_multiple=PAD, scale=0.0)
    for ch in chunks:
        for p in ch.parameters():
            p.data.fill_(float("nan"))
    loaded = mgr.load("latest", chunks, contents=[source])
    assert loaded is not None and loaded.step == 3
    want = fake_chunks(c["hf"], layout, RankCoords(), pad_vocab_to_multiple=PAD,
                       scale=step_value(3))
    for got, exp in zip(chunks, want, strict=True):
        for (n, a), (_, b) in zip(got.named_parameters(), exp.named_parameters(), strict=True):
            assert torch.equal(a, b), (source, n)


@pytest.mark.parametrize("source", ["model", "hf_model"])
@pytest.mark.parametrize("case", [c[0] for c in SAVE_CASES])
def test_any_layout_loads_into_one_rank(saved: dict, case: str, source: str) -> None:
    _load_in_process(saved[case], source, ParallelLayout())


def test_tp2_pp2_checkpoint_loads_at_pp2_vpp2_and_tp4(saved: dict) -> None:
    for job in saved["loads"]:
        for r in range(4):
            d = torch.load(Path(job["out"]) / f"rank{r}.pt", weights_only=False)
            assert d["step"] == 3
            assert d["got"].keys() == d["want"].keys() and d["got"]
            for k in d["got"]:
                assert torch.equal(d["got"][k], d["want"][k]), (job["out"], r, k)
            # extra: plain values come back from the common state
            assert d["extra"] == {"scheduler": {"num_steps": 3, "lr": 0.125}}


# --------------------------------------------------------------------------------------------
# Commit protocol
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hf(tmp_path_factory.mktemp("manager_src"), "llama")


def test_manifest_then_tracker_are_written_last_sync_and_async(small_hf: Path,
                                                               tmp_path: Path) -> None:
    """Right after each commit: every data file <= manifest <= tracker (mtimes, ns)."""
    root = tmp_path / "run"
    base = {"hf": str(small_hf), "root": str(root), "layout": {"tp": 2}, "pad": PAD,
            "contents": ["model", "hf_model", "extra"], "keep_last": 2}
    sync = {**base, "steps": [1, 2, 3], "out": str(tmp_path / "sync.json")}
    # Async, and the weights change as soon as save() returns (training goes on).
    asyn = {**base, "steps": [4, 5], "async": True, "mutate": True,
            "out": str(tmp_path / "async.json")}
    run_ranks("save", [sync, asyn], 2, tmp_path / "logs")
    for job, pending in ((sync, False), (asyn, True)):
        report = json.loads(Path(job["out"]).read_text())
        assert sorted(map(int, report)) == job["steps"]
        for step, r in report.items():
            assert r["pending"] == (int(step) if pending else None)
            assert r["data"] <= r["manifest"] <= r["tracker"], (step, r)
            assert r["tracker_step"] == int(step)
    assert committed_steps(root) == [4, 5]  # keep_last=2
    # The async steps hold the weights of the moment save() returned.
    src = ckpt_ir.open(small_hf)
    for step in (4, 5):
        hf = ckpt_ir.open(_unit(root, step) / "model/huggingface")
        for n in src.tensors:
            assert torch.equal(hf.read(n), src.read(n) * step_value(step)), (step, n)


CRASH_PHASES = ["before-manifest", "before-publish", "before-tracker", "before-retention",
                "mid-retention"]
# The commit runs on rank 0 (in the background thread when async); one process is enough to
# kill it at each phase, and starts fastest. Random kills of 2-rank jobs are below.
CRASH_CASES = [(p, False) for p in CRASH_PHASES] + [("before-tracker", True)]


def test_killed_at_each_commit_step_keeps_the_previous_checkpoint(small_hf: Path,
                                                                 tmp_path: Path) -> None:
    """SIGKILL of the job when the commit of step 3 reaches each phase (keep_last=1)."""
    def crash(case: tuple[str, bool]) -> tuple[tuple[str, bool], Path]:
        phase, asynchronous = case
        root = tmp_path / f"{phase}-{'async' if asynchronous else 'sync'}"
        job = {"hf": str(small_hf), "root": str(root), "steps": [1, 2, 3],
               "contents": ["model", "hf_model"], "keep_last": 1, "phase": phase,
               "async": asynchronous}
        codes = run_ranks("crash-at", job, 1, root.with_suffix(".logs"))
        assert codes == [-9], (case, codes)  # killed, not finished
        return case, root

    with ThreadPoolExecutor(max_workers=2) as pool:
        roots = dict(pool.map(crash, CRASH_CASES))
    for (phase, _), root in roots.items():
        committed = 3 if phase in ("before-retention", "mid-retention") else 2
        assert latest_step(root) == committed, phase
        # Nothing newer than the tracker is trusted, whatever is on disk.
        assert committed_steps(root)[-1] == committed, phase
        _check_step_holds(small_hf, root, committed)
    # A restarted job cleans the leftovers and commits again.
    assert (_unit(roots["before-tracker", False], 3) / MANIFEST).is_file()  # tracker says 2
    assert any(p.name.startswith(".") for p in roots["mid-retention", False].iterdir())
    resumed = [roots["before-tracker", False], roots["mid-retention", False]]
    run_ranks("save", [{"hf": str(small_hf), "root": str(root), "steps": [3, 4] if
                        latest_step(root) == 2 else [4], "contents": ["model", "hf_model"],
                        "keep_last": 1} for root in resumed], 1, tmp_path / "resume.logs")
    for root in resumed:
        assert committed_steps(root) == [4] and latest_step(root) == 4
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
        _check_step_holds(small_hf, root, 4)


def _check_step_holds(hf: Path, root: Path, step: int) -> None:
    src = ckpt_ir.open(hf)
    out = ckpt_ir.open(_unit(root, step) / "model/huggingface")
    for n in list(src.tensors)[:6]:
        assert torch.equal(out.read(n), src.read(n) * step_value(step)), (step, n)
    back = ckpt_ir.open(_unit(root, step) / "model/dist_ckpt")
    n = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(back.read(n), src.read(n) * step_value(step))


def test_async_saves_killed_at_random_moments(small_hf: Path, tmp_path: Path) -> None:
    """Back-to-back async saves of a 2-rank job (keep_last=2) SIGKILLed at a random moment;
    the tracker's step is complete and intact, and the next job resumes from it and is
    killed in turn."""
    rng = random.Random(20261122)
    root = tmp_path / "run"
    first = 1
    for attempt in range(2):
        progress = tmp_path / f"progress-{attempt}"
        progress.touch()
        job = {"hf": str(small_hf), "root": str(root), "layout": {"tp": 2}, "pad": PAD,
               "contents": ["model", "hf_model"], "keep_last": 2, "first": first,
               "progress": str(progress)}
        procs = start_ranks("kill-loop", job, 2, tmp_path / f"logs-{attempt}")
        try:
            deadline = time.monotonic() + 90
            while not progress.read_text().split() and time.monotonic() < deadline:
                if any(p.poll() is not None for p in procs):
                    break
                time.sleep(0.05)
            assert progress.read_text().split(), (tmp_path / f"logs-{attempt}" /
                                                  "rank0.log").read_text()[-3000:]
            time.sleep(rng.uniform(0.0, 1.5))  # somewhere in a later save or commit
        finally:
            kill_ranks(procs)
        done = [int(s) for s in progress.read_text().split()]
        latest = latest_step(root)
        assert latest is not None and latest >= max(done)
        steps = committed_steps(root)
        # keep_last=2, plus one more when the kill fell between the tracker and retention.
        assert steps[-1] == latest and 1 <= len(steps) <= 3
        _check_step_holds(small_hf, root, latest)
        # What load("latest") returns in this process.
        mgr = CheckpointManager(root, hf_config=small_hf, layout=ParallelLayout())
        chunks = fake_chunks(small_hf, ParallelLayout(), RankCoords(), pad_vocab_to_multiple=PAD,
                             scale=0.0)
        loaded = mgr.load("latest", chunks)
        assert loaded is not None and loaded.step == latest
        emb = dict(chunks[0].named_parameters())["embedding.word_embeddings.weight"]
        want = ckpt_ir.open(small_hf).read("model.embed_tokens.weight") * step_value(latest)
        assert torch.equal(emb[: want.shape[0]], want)
        first = latest + 1


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def test_hf_model_save_peak_memory_is_own_shard_plus_one_destination_tensor(
        tmp_path: Path) -> None:
    hf = hf_models.make_hf_model("llama", tmp_path / "src", hidden_size=512,
                                 intermediate_size=1536, num_attention_heads=8, head_dim=64,
                                 num_key_value_heads=2, vocab_size=4096,
                                 num_hidden_layers=LAYERS)
    src = ckpt_ir.open(hf)
    model_bytes = sum(s.nbytes for s in src.tensors.values())
    largest = max(s.nbytes for s in src.tensors.values())
    run_ranks("memory", {"hf": str(hf), "root": str(tmp_path / "run"), "layout": {"tp": 2},
                         "out": str(tmp_path / "mem")}, 2, tmp_path / "logs")
    slack = 4 * 2**20  # allocator and interpreter noise
    grown = []
    for r in range(2):
        m = json.loads((tmp_path / "mem" / f"rank{r}.json").read_text())
        grown.append((m["peak_kb"] - m["base_kb"]) * 1024)
        assert m["shard_bytes"] < 0.6 * model_bytes  # a TP=2 shard, not the model
    # The shard is resident already (it is the model); the save adds at most one destination
    # tensor, far from the model a gather would need...
    assert model_bytes > 5 * (largest + slack)
    assert max(grown) <= largest + slack, (grown, largest)
    # ...and the measure does see the destination tensors being assembled.
    assert max(grown) >= largest // 2, (grown, largest)


# --------------------------------------------------------------------------------------------
# In-process checks: geometry, retention, errors, sharded pass-through
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_geometry_and_segments_agree_with_layout_shard(arch: str, tp: int) -> None:
    """Index arithmetic == data arithmetic: the rows/columns ``shard_geometry`` names are
    ``layout.shard``'s piece, and the segments rebuild it from the IR tensors."""
    config = ModelConfig.from_hf(hf_models.hf_config(arch, num_hidden_layers=2).to_dict())
    table = build_table("mcore", config, NativeParams(padded_vocab_size=384,
                                                      norm_style="local"))
    schema = config.schema()
    gen = torch.Generator().manual_seed(tp)
    ir = {n: torch.randn(s, generator=gen) for n, s in schema.items()}
    for b in table.bindings:
        native = b.transform.apply({r: ir[n] for r, n in b.ir.items()})
        for t in range(tp):
            piece = shard(native, b.partition, tp)[t]
            g = shard_geometry(b.partition, tuple(native.shape), tp, t)
            cut = torch.cat([native[r.start:r.stop] for r in g.rows])
            if g.cols is not None:
                cut = cut[..., g.cols.start:g.cols.stop]
            assert torch.equal(cut, piece), (b.native, t)
            rebuilt = torch.zeros_like(piece)
            part_rows = {r: schema[n][0] for r, n in b.ir.items()}
            for s in row_segments(b, part_rows, g):
                if s.role is not None:
                    src = ir[b.ir[s.role]][s.part:s.part + s.length]
                    if g.cols is not None:
                        src = src[..., g.cols.start:g.cols.stop]
                    rebuilt[s.local:s.local + s.length] = src
            assert torch.equal(rebuilt, piece), (b.native, t)


def _manager(root: Path, hf: Path, **kw: Any) -> CheckpointManager:
    return CheckpointManager(root, hf_config=hf, **kw)


def _save(mgr: CheckpointManager, hf: Path, step: int, **kw: Any) -> None:
    chunks = fake_chunks(hf, ParallelLayout(), RankCoords(), scale=step_value(step))
    mgr.save(step, chunks, **kw)


def test_retention_keeps_newest_and_never_the_only_one(small_hf: Path, tmp_path: Path) -> None:
    mgr = _manager(tmp_path / "run", small_hf, keep_last=1, disk_layout="plain")
    for step in (10, 20, 30):
        _save(mgr, small_hf, step, contents=["hf_model"])
        assert committed_steps(tmp_path / "run", DiskLayout("plain")) == [step]
    assert (tmp_path / "run" / TRACKER).read_text() == "30"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "iter_0000030", TRACKER]
    mgr2 = _manager(tmp_path / "keep3", small_hf, keep_last=3)
    for step in range(1, 6):
        _save(mgr2, small_hf, step, contents=["hf_model"], async_=True)
    mgr2.wait()
    assert mgr2.committed_steps() == [3, 4, 5]


def test_incomplete_and_untracked_steps_are_not_trusted(small_hf: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = _manager(root, small_hf)
    assert mgr.latest_step() is None
    assert mgr.load("latest", fake_chunks(small_hf, ParallelLayout(), RankCoords())) is None
    _save(mgr, small_hf, 1, contents=["model"])
    # A later save that died before its manifest, and one that died before the tracker.
    (root / "global_step_2" / "actor" / "model").mkdir(parents=True)
    (root / "global_step_3" / "actor").mkdir(parents=True)
    (root / "global_step_3" / "actor" / MANIFEST).write_text(
        (_unit(root, 1) / MANIFEST).read_text())
    assert latest_step(root) == 1 and committed_steps(root) == [1]
    with pytest.raises(CorruptCheckpointError, match="not a committed checkpoint"):
        mgr.load(3, fake_chunks(small_hf, ParallelLayout(), RankCoords()))
    # Without a tracker, the newest step with a manifest counts (and only those).
    (root / TRACKER).unlink()
    assert latest_step(root) == 3
    (root / TRACKER).write_text("2")
    with pytest.raises(CorruptCheckpointError, match=r"names step 2, but .* has no "
                                                      r"ckpt_contents\.json"):
        latest_step(root)
    (root / TRACKER).write_text("1")
    with pytest.raises(DestinationExistsError, match="step 1 is already committed"):
        _save(mgr, small_hf, 1, contents=["model"])
    _save(mgr, small_hf, 2, contents=["model"])  # replaces the dead step 2 and 3's leftovers
    assert committed_steps(root) == [1, 2]


def test_usage_errors_are_typed_and_leave_nothing(small_hf: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = _manager(root, small_hf)
    chunks = fake_chunks(small_hf, ParallelLayout(), RankCoords())
    with pytest.raises(FormatError, match=r"unknown contents \['weights'\]"):
        mgr.save(1, chunks, contents=["weights"])
    with pytest.raises(FormatError, match="contents has 'optimizer' but no optimizer state"):
        mgr.save(1, chunks, contents=["model", "optimizer"])
    with pytest.raises(FormatError, match="hf_model is written from the model chunks"):
        mgr.save(1, {"w": ShardedObject("w", 1, (1,), (0,))}, contents=["hf_model"])
    # Chunks of another model (2 of its 4 layers): every problem at once, nothing written.
    short = hf_models.make_hf_model("llama", tmp_path / "short", num_hidden_layers=2)
    with pytest.raises(PlanError) as e:
        mgr.save(1, fake_chunks(short, ParallelLayout(), RankCoords()), contents=["hf_model"])
    assert len(e.value.problems) == 12  # 6 tensors in each of layers 2 and 3
    assert e.value.problems[0].startswith("no rank holds decoder.layers.2.")
    assert not any(root.iterdir())
    with pytest.raises(FormatError, match="from 'model' or from 'hf_model', not both"):
        mgr.load("latest", chunks, contents=["model", "hf_model"])


def test_sharded_state_passes_through_and_reshards(tmp_path: Path) -> None:
    """Two "ranks" of a TP=2 sharded state dict (stand-in classes), read back at TP=1."""
    full = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)  # [layers, rows, cols]

    def rank_state(tp_rank: int) -> dict:
        return {"optimizer": {"state": {0: {"exp_avg": ShardedTensor(
            "optimizer.state.exp_avg.w", full[:, :, 2 * tp_rank:2 * tp_rank + 2][0].clone(),
            torch.float32, (3, 2), (1, 3, 4), (0, 0, 2 * tp_rank), (1, 1, 2),
            replica_id=(0, 0, 0), prepend_axis_num=1)}},
            "param_groups": [{"lr": 0.1, "params": LocalNonpersistentObject([0])}]},
            "rng": ShardedObject("rng", {"tp": tp_rank}, (2,), (tp_rank,)),
            "replicated": ShardedTensor("b", torch.ones(3), torch.float32, (3,), (3,), (0,),
                                        (1,), replica_id=tp_rank)}

    out = tmp_path / "dist"
    out.mkdir()
    snaps = [snapshot(rank_state(r), copy_data=True, what="optimizer") for r in range(2)]
    parts = [write_sharded_rank(out, s, r) for r, s in enumerate(snaps)]
    finish_sharded(out, parts, snaps[0].common)
    request = {"optimizer": {"state": {0: {"exp_avg": ShardedTensor(
        "optimizer.state.exp_avg.w", None, torch.float32, (3, 4), (1, 3, 4), (0, 0, 0),
        (1, 1, 1), prepend_axis_num=1)}},
        "param_groups": [{"lr": 0.0, "params": LocalNonpersistentObject([7])}]},
        "rng": ShardedObject("rng", None, (2,), (1,)),
        "replicated": ShardedTensor("b", torch.zeros(3), torch.float32, (3,), (3,), (0,), (1,))}
    got = load_sharded(out, request, trust_pickles=True)
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], full[0])
    assert got["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [7]}]
    assert got["rng"] == {"tp": 1}
    assert torch.equal(got["replicated"], torch.ones(3))
    # A shard claimed by nobody is the caller's error, named.
    gap = tmp_path / "gap"
    gap.mkdir()
    only = [write_sharded_rank(gap, snaps[0], 0)]
    with pytest.raises(FormatError, match=r"does not describe one checkpoint.*has a gap"):
        finish_sharded(gap, only, snaps[0].common)


def test_model_format_hf_shares_one_tree_with_hf_model(small_hf: Path, tmp_path: Path) -> None:
    """verl's bridge mode: ``model`` stored as HF; with ``hf_model`` too, written once."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text("{}\n")
    root = tmp_path / "run"
    mgr = _manager(root, small_hf, model_format="hf", tokenizer=tokenizer)
    _save(mgr, small_hf, 1, contents=["model", "hf_model"])
    unit = _unit(root, 1)
    manifest = json.loads((unit / MANIFEST).read_text())
    assert manifest["contents"]["model"]["path"] == "model/huggingface"
    assert manifest["contents"]["hf_model"]["path"] == "model/huggingface"
    assert manifest["backend"]["use_dist_checkpointing"] is False
    assert [p.name for p in (unit / "model").iterdir()] == ["huggingface"]
    assert sorted(p.name for p in (unit / "model/huggingface").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer_config.json"]
    chunks = fake_chunks(small_hf, ParallelLayout(), RankCoords(), scale=0.0)
    assert mgr.load("latest", chunks).step == 1
    want = fake_chunks(small_hf, ParallelLayout(), RankCoords(), scale=step_value(1))
    for a, b in zip(chunks[0].parameters(), want[0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_model_only_save_is_a_tree_verl_opens(small_hf: Path, tmp_path: Path) -> None:
    """What verl 0.9.1 writes and reads (verl-formats.md §2.4, MegatronCheckpointManager):
    ``model/huggingface/config.json`` beside a torch_dist-only model (verl's merger reads it
    there), ``transformer_config.json`` with ``extra``, and the manifest's entries."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text("{}\n")
    root = tmp_path / "run"
    mgr = _manager(root, small_hf, tokenizer=tokenizer)
    _save(mgr, small_hf, 1, contents=["model"])
    unit = _unit(root, 1)
    assert sorted(p.name for p in (unit / "model").iterdir()) == ["dist_ckpt", "huggingface"]
    assert sorted(p.name for p in (unit / "model/huggingface").iterdir()) == [
        "config.json", "tokenizer_config.json"]
    config = json.loads((unit / "model/huggingface/config.json").read_text())
    assert config == json.loads((small_hf / "config.json").read_text())
    manifest = json.loads((unit / MANIFEST).read_text())
    assert manifest["contents"] == {
        "model": {"path": "model/dist_ckpt", "format": "megatron_dist_checkpoint",
                  "backend": "dist_checkpointing"},
        "hf_config": {"path": "model/huggingface", "format": "huggingface",
                      "note": "config.json, tokenizer, and optional generation_config.json"},
        "tokenizer": {"path": "model/huggingface", "format": "huggingface"}}
    assert not (unit / "transformer_config.json").exists()  # verl: only with 'extra'
    # ckpt-ir reads it back from the run directory, config from model/huggingface.
    with ckpt_ir.open(root) as got, ckpt_ir.open(small_hf) as ref:
        assert got.format == "mcore-dist" and got.path == str(unit / "model/dist_ckpt")
        assert {n: s.shape for n, s in got.tensors.items()} == \
            {n: s.shape for n, s in ref.tensors.items()}
    # With the optimizer and extra state: the lr_scheduler / rng_state entries verl's
    # manifest has, and transformer_config.json.
    chunks = fake_chunks(small_hf, ParallelLayout(), RankCoords(), scale=step_value(2))
    mgr.save(2, chunks, contents=["model", "extra"],
             extra={"rng_state": {"seed": 7}, "iteration": 2})
    unit = _unit(root, 2)
    manifest = json.loads((unit / MANIFEST).read_text())
    assert manifest["contents"]["rng_state"] == {
        "path": "extra/dist_ckpt", "format": "megatron_dist_checkpoint", "key": "rng_state"}
    assert manifest["contents"]["transformer_config"] == {
        "path": "transformer_config.json", "format": "json"}
    tc = json.loads((unit / "transformer_config.json").read_text())
    cfg = ModelConfig.from_hf(json.loads((small_hf / "config.json").read_text()))
    assert (tc["num_layers"], tc["hidden_size"], tc["num_query_groups"],
            tc["tensor_model_parallel_size"]) == (cfg.num_layers, cfg.hidden_size,
                                                  cfg.num_key_value_heads, 1)


def test_critic_saves_its_value_head(tmp_path: Path) -> None:
    """verl's critic (output layer [1, H]) through the manager: torch_dist and HF outputs are
    the source bit for bit; the HF output is a token-classification model."""
    from tests.fixtures import TINY_LLAMA, write_hf

    critic = dict(TINY_LLAMA, model_type="qwen2", architectures=["Qwen2ForTokenClassification"],
                  tie_word_embeddings=True, id2label={"0": "LABEL_0"},
                  token_classification_bias=False)
    write_hf(tmp_path / "hf", critic)
    root = tmp_path / "run"
    mgr = _manager(root, tmp_path / "hf", role="critic")
    mgr.save(1, fake_chunks(tmp_path / "hf", ParallelLayout(), RankCoords()),
             contents=["model", "hf_model"])
    unit = root / "global_step_1" / "critic"
    for out in (unit / "model/huggingface", root):
        report = ckpt_ir.verify(tmp_path / "hf", out)
        assert report.equal and "score.weight" in [t.name for t in report.tensors], \
            report.summary()
    config = json.loads((unit / "model/huggingface/config.json").read_text())
    assert config["architectures"] == ["Qwen2ForTokenClassification"]


def test_a_failed_async_write_commits_nothing(small_hf: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "run"
    mgr = _manager(root, small_hf)
    _save(mgr, small_hf, 1, contents=["model", "hf_model"])

    def disk_full(self: Any, name: str, tensor: torch.Tensor) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(HfWriter, "write", disk_full)
    _save(mgr, small_hf, 2, contents=["model", "hf_model"], async_=True)
    with pytest.raises(DestinationError, match="rank 0 cannot write step 2: No space left"):
        mgr.wait()
    assert latest_step(root) == 1 and committed_steps(root) == [1]
    assert sorted(p.name for p in root.iterdir()) == ["global_step_1", TRACKER]
    mgr.wait()  # the error was reported once
