"""The tiered resume sink: a fast tier on local disk in front of a durable tier on a real S3
server on loopback (moto's), each copy committed with its own verified manifest."""

from __future__ import annotations

import shutil
import signal
import uuid
from pathlib import Path

import attrs
import fsspec
import pytest
import torch
import zygote
from builders import merge, recipe, write
from conftest import S3_ENV

from wmtp_core import BindingError, CheckpointError, Role, RunInfo, SaveError, SinkContext, hookimpl
from wmtp_core.bindings import SinkBinding
from wmtp_core.commit import CheckpointStore
from wmtp_core.testing import SinkContract, assert_same, event_for, resume_payload
from wmtp_plugins import tiered

S3_OPTIONS = {"key": S3_ENV["AWS_ACCESS_KEY_ID"], "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]}


# ----------------------------------------------------------------------------- the shipped contract
@pytest.mark.slow
class TestTieredSink(SinkContract):
    sink_name = "tiered"
    roles = (Role.RESUME,)
    plugin = tiered

    @pytest.fixture(autouse=True)
    def _server(self, s3_server, bucket):
        self.endpoint, self.bucket = s3_server, bucket

    def make_sink(self, context):
        return tiered.TieredSink(context)

    def storage_options(self, tmp_path):
        return {"endpoint_url": self.endpoint, **S3_OPTIONS}

    def make_context(self, tmp_path, role, run):
        return SinkContext(role=role, run=run, base_path="file://unused", options={
            "fast": f"file://{tmp_path}/fast", "durable": f"s3://{self.bucket}/contract",
            **self.storage_options(tmp_path)})

    def corrupt(self, sink, receipt):
        """A flipped byte in the largest file of both copies: the step verifies in neither tier."""
        sink.wait()  # the durable copy is there
        for tier in (sink.fast, sink.durable):
            path = tier.checkpoints.path_of(sink.run, f"step_{receipt.step}")
            entry = max(tier.checkpoints.read_manifest(path).files, key=lambda f: f.size)
            data = bytearray(tier.checkpoints.fs.cat_file(f"{path}/{entry.path}"))
            data[len(data) // 2] ^= 0xFF
            tier.checkpoints.fs.pipe_file(f"{path}/{entry.path}", bytes(data))


# ----------------------------------------------------------------------------- the sink on its own
def sink_for(tmp_path: Path, durable: str, run: RunInfo | None = None, **options) -> tiered.TieredSink:
    run = run or RunInfo(name="r", algo="baseline-mtp", lineage="L1")
    return tiered.TieredSink(SinkContext(role=Role.RESUME, run=run, base_path="file://unused", options={
        "fast": f"file://{tmp_path}/fast", "durable": durable, **options}))


def save(sink, step: int):
    payload = resume_payload(step)
    return payload, sink.store(event=event_for(sink.durable.context.run, Role.RESUME, step, payload), payload=payload)


def steps(store: CheckpointStore, run: str = "r") -> list[int]:
    return [m.step for _, m in store.list(run)]


def flip(store: CheckpointStore, run: str, step: int) -> str:
    """Flip a byte in the middle of the largest file of a committed checkpoint; its name."""
    path = store.path_of(run, f"step_{step}")
    entry = max(store.read_manifest(path).files, key=lambda e: e.size)
    data = bytearray(store.fs.cat_file(f"{path}/{entry.path}"))
    data[len(data) // 2] ^= 0xFF
    store.fs.pipe_file(f"{path}/{entry.path}", bytes(data))
    return entry.path


@pytest.mark.slow
def test_each_tier_keeps_its_own_copies_and_load_prefers_the_fast_one_that_verifies(tmp_path, s3_server, bucket):
    sink = sink_for(tmp_path, f"s3://{bucket}/t", endpoint_url=s3_server, fast_keep_last=1)
    try:
        payloads = {}
        for step in (2, 4, 6):
            payloads[step], receipt = save(sink, step)
            assert receipt.uri == f"s3://{bucket}/t/r/step_{step}"  # the durable URI, from the start
        sink.wait()
        fast, durable = sink.fast.checkpoints, sink.durable.checkpoints
        assert steps(fast) == [6] and steps(durable) == [2, 4, 6]
        for path, m in durable.list("r"):
            assert durable.verify(path).step == m.step  # every durable copy verifies on its own
        digests = [(e.path, e.digest) for e in fast.read_manifest(fast.path_of("r", "step_6")).files]
        assert [(e.path, e.digest) for e in durable.read_manifest(durable.path_of("r", "step_6")).files] == digests
        assert [(u, m.step) for u, m in sink.committed()] == [(f"s3://{bucket}/t/r/step_{s}", s) for s in (2, 4, 6)]

        # the fast copy is taken when it verifies; a flipped byte there falls back to the durable one
        assert_same(dict(payloads[6].parts), dict(sink.load(f"s3://{bucket}/t/r/step_6").parts))
        flip(fast, "r", 6)
        assert_same(dict(payloads[6].parts), dict(sink.load(f"s3://{bucket}/t/r/step_6").parts))
        name = flip(durable, "r", 6)
        with pytest.raises(CheckpointError, match=f"verifies in neither tier.*{name}"):
            sink.load(f"s3://{bucket}/t/r/step_6")

        # the router's retention deletes both copies
        sink.delete(f"s3://{bucket}/t/r/step_6")
        assert steps(fast) == [] and steps(durable) == [2, 4]
    finally:
        sink.close()

    # a new machine: the fast tier is gone, the durable tier has everything
    shutil.rmtree(tmp_path / "fast")
    again = sink_for(tmp_path, f"s3://{bucket}/t", endpoint_url=s3_server)
    try:
        assert [m.step for _, m in again.committed()] == [2, 4]
        assert_same(dict(payloads[4].parts), dict(again.load(f"s3://{bucket}/t/r/step_4").parts))
    finally:
        again.close()


def test_retention_never_leaves_the_durable_tier_without_a_checkpoint_while_newer_ones_are_copied(
        tmp_path, s3_server, bucket):
    """Retention deletes step 2 while step 4 is still on its way to a slow durable tier: step 2's
    durable copy stays (the router no longer sees it) until step 4's commits there; a machine
    lost in between resumes from step 2, not from nothing."""
    from faultproxy import FaultProxy

    with FaultProxy(s3_server, slow_s=3.0) as proxy:
        sink = sink_for(tmp_path, f"s3://{bucket}/t", endpoint_url=proxy.url, fast_keep_last=1)
        try:
            save(sink, 2)
            sink.wait()
            durable = CheckpointStore.from_url(f"s3://{bucket}/t", endpoint_url=s3_server, skip_instance_cache=True)
            assert steps(durable) == [2]
            proxy.configure(rate=1.0, kinds=("slow",), match=r"^PUT /[^/]+/t/r/step_4/manifest\.json")
            payload4, _ = save(sink, 4)
            sink.delete(f"s3://{bucket}/t/r/step_2")  # what retention with keep_last: 1 does now
            assert [m.step for _, m in sink.committed()] == [4]
            with pytest.raises(CheckpointError, match="deleted by the retention policy"):
                sink.load(f"s3://{bucket}/t/r/step_2")
            durable.fs.invalidate_cache()
            assert steps(durable) == [2], "the only durable checkpoint is kept while step 4 is copied"

            # a new machine now (the fast tier is lost) resumes from step 2
            other = sink_for(tmp_path / "other", f"s3://{bucket}/t", endpoint_url=s3_server)
            try:
                assert [m.step for _, m in other.committed()] == [2]
                other.load(f"s3://{bucket}/t/r/step_2")
            finally:
                other.close()

            sink.wait()
            assert proxy.counts["slow"] >= 1
            durable.fs.invalidate_cache()
            assert steps(durable) == [4], "released once a newer durable copy committed"
            assert_same(dict(payload4.parts), dict(sink.load(f"s3://{bucket}/t/r/step_4").parts))
        finally:
            sink.close()


def test_a_fast_copy_that_does_not_match_its_manifest_is_never_committed_on_the_durable_tier(tmp_path):
    """A checkpoint an earlier process committed on the fast tier (and never copied) is copied
    at the next run's first save, verified as it streams: a flipped byte stops the copy before
    the durable manifest, the failure is raised, and the fast copy stays."""
    run = RunInfo(name="r", algo="baseline-mtp", lineage="L1")
    first = sink_for(tmp_path, f"file://{tmp_path}/durable", run)
    first.fast.store(event=event_for(run, Role.RESUME, 2, resume_payload(2)), payload=resume_payload(2))
    first.close()
    name = flip(first.fast.checkpoints, "r", 2)

    sink = sink_for(tmp_path, f"file://{tmp_path}/durable", run)
    save(sink, 4)
    with pytest.raises(SaveError, match=f"durable copy of step 2 .*{name} does not match its manifest"):
        sink.close()
    durable = sink.durable.checkpoints
    assert steps(durable) == [4]
    assert durable.staging("r") == []  # begun, never committed, and removed by the failed copy
    assert steps(sink.fast.checkpoints) == [2, 4]  # the only copy of step 2 is kept


def test_staging_in_either_tier_is_never_listed_and_a_foreign_directory_is_never_overwritten(tmp_path):
    sink = sink_for(tmp_path, f"file://{tmp_path}/durable")
    try:
        save(sink, 2)
        sink.wait()
        for store, step in ((sink.fast.checkpoints, 8), (sink.durable.checkpoints, 10)):
            staging = store.prepare("r", f"step_{step}")  # a save that did not finish
            store.fs.pipe_file(f"{staging}/model.pt", b"half a checkpoint")
        foreign = tmp_path / "fast" / "r" / "step_12"
        foreign.mkdir()
        (foreign / "pytorch_model.bin").write_bytes(b"another tool's weights")
        assert [m.step for _, m in sink.committed()] == [2]
        with pytest.raises(CheckpointError, match="not written by WMTP"):
            save(sink, 12)
        assert (foreign / "pytorch_model.bin").read_bytes() == b"another tool's weights"
        save(sink, 8)  # replaces the staging
        sink.wait()
        assert steps(sink.durable.checkpoints) == [2, 8]
    finally:
        sink.close()


def test_the_fast_tier_keeps_the_checkpoint_the_run_resumed_from(tmp_path):
    first = sink_for(tmp_path, f"file://{tmp_path}/durable")
    save(first, 2)
    first.close()
    resumed = RunInfo(name="r", algo="baseline-mtp", lineage="L1", resumed_from=f"{tmp_path}/durable/r/step_2")
    sink = sink_for(tmp_path, f"file://{tmp_path}/durable", resumed, fast_keep_last=1)
    for step in (4, 6):
        save(sink, step)
    sink.close()
    assert steps(sink.fast.checkpoints) == [2, 6]  # 4 pruned after its copy; 2 protected
    assert steps(sink.durable.checkpoints) == [2, 4, 6]
    # --resume URI takes either tier's URI of a step; another run's checkpoint protects nothing here
    assert sink.load(f"{tmp_path}/fast/r/step_2").manifest.step == 2
    other = RunInfo(name="r", algo="baseline-mtp", lineage="L1", resumed_from=f"{tmp_path}/elsewhere/x/step_2")
    stranger = sink_for(tmp_path, f"file://{tmp_path}/durable", other)
    assert stranger.resumed_from is None
    stranger.close()


def test_a_sharded_checkpoint_is_copied_with_its_dcp_metadata(tmp_path):
    """DCP's shard files and ``.metadata`` (a name the plain write path refuses) reach the
    durable tier and commit with the fast manifest's digests."""
    run = RunInfo(name="r", algo="baseline-mtp", lineage="L1")
    fast = CheckpointStore.from_url(f"file://{tmp_path}/fast")
    path = fast.prepare("r", "step_2")
    for name, data in {"__0_0.distcp": b"shard" * 1000, ".metadata": b"meta", "trainer_rank0.pt": b"t"}.items():
        fast.fs.pipe_file(f"{path}/{name}", data)
    fast.commit_existing("r", "step_2", step=2, role=Role.RESUME, lineage="L1",
                         meta={"format": "dcp", "world_size": 1})
    sink = sink_for(tmp_path, f"file://{tmp_path}/durable", run, fast_keep_last=5)
    save(sink, 4)
    sink.close()
    durable = sink.durable.checkpoints
    copied = durable.verify(durable.path_of("r", "step_2"))
    assert {(e.path, e.digest) for e in copied.files} == \
        {(e.path, e.digest) for e in fast.read_manifest(path).files}
    assert copied.meta["format"] == "dcp" and durable.fs.cat_file(f"{durable.path_of('r', 'step_2')}/.metadata") == b"meta"


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("missing", ["fast", "durable"])
def test_the_check_names_a_missing_tier(missing):
    options = {"fast": "file:///tmp/fast", "durable": "s3://b/ck"}
    del options[missing]
    binding = SinkBinding(role=Role.RESUME, sink="tiered", options=options, origin="c.yaml: storage.resume.sink")
    with pytest.raises(BindingError, match=f"c.yaml: storage.resume.options.{missing}: sink 'tiered' needs a {missing} tier"):
        tiered.check(binding)


def test_s3_retries_and_block_size_come_from_the_client_settings_unless_given():
    assert tiered.durable_options("s3://b/x", {}) == {
        "default_block_size": 256 << 20,
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 5, "mode": "standard"}}}
    given = tiered.durable_options("s3://b/x", {"config_kwargs": {"retries": {"max_attempts": 2}, "read_timeout": 9}})
    assert given["config_kwargs"] == {"retries": {"max_attempts": 2, "mode": "standard"}, "read_timeout": 9,
                                      "connect_timeout": 5}
    assert tiered.durable_options("file:///d", {}) == {}


def test_a_dry_run_refuses_tiered_without_durable_naming_the_key(tmp_path, capsys):
    from wmtp_core.run import main

    write(tmp_path / "c.yaml", {"mlflow": None, "paths": {"checkpoints": {"save_final": False}},
                                "storage": {"resume": {"sink": "tiered", "options": {"fast": f"file://{tmp_path}/fast"}}}})
    write(tmp_path / "r.yaml", recipe(2))
    code = main(["--config", str(tmp_path / "c.yaml"), "--recipe", str(tmp_path / "r.yaml"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "storage.resume.options.durable: sink 'tiered' needs a durable tier" in err and "Traceback" not in err
    assert not (tmp_path / "fast").exists()


def test_the_tier_keys_reach_the_sink_through_its_options_and_the_old_keys_still_load(tmp_path, capsys):
    """The core schema knows no tier key: they are the tiered sink's options. A config that sets
    them where they used to go (storage.resume.fast) still loads, with a one-line notice."""
    from wmtp_core.config import load_settings
    from wmtp_core.config.routing import bindings_for
    from wmtp_core.config.schema import RoleStorage
    from wmtp_core.plugins import build_catalog, make_plugin_manager
    from wmtp_core.run import main

    assert not {"fast", "durable", "fast_keep_last"} & {f.name for f in attrs.fields(RoleStorage)}
    old = {"sink": "tiered", "fast": "file:///f", "durable": "s3://b/d", "fast_keep_last": 3,
           "options": {"endpoint_url": "http://x"}}
    new = {"sink": "tiered", "options": {"endpoint_url": "http://x", "fast": "file:///f", "durable": "s3://b/d",
                                         "fast_keep_last": 3}}
    catalog = build_catalog(make_plugin_manager())
    found = {}
    for name, section in (("old", old), ("new", new)):
        write(tmp_path / f"{name}.yaml", {"mlflow": None, "storage": {"resume": section}})
        settings = load_settings(str(tmp_path / f"{name}.yaml"))
        found[name] = (dict(bindings_for(settings, catalog).sink_for(Role.RESUME).options), settings.deprecated)
    assert found["old"][0] == found["new"][0] == new["options"]
    assert found["new"][1] == ()
    assert [n.split(": ", 1)[1] for n in found["old"][1]] == [
        f"storage.resume.{k} is deprecated; write it as storage.resume.options.{k} (read from there now)"
        for k in ("fast", "durable", "fast_keep_last")]
    write(tmp_path / "both.yaml", {"storage": {"resume": {"sink": "tiered", "fast": "file:///a",
                                                          "options": {"fast": "file:///b"}}}})
    write(tmp_path / "r.yaml", recipe(2))
    assert main(["--config", str(tmp_path / "both.yaml"), "--recipe", str(tmp_path / "r.yaml"), "--dry-run"]) == 2
    assert "storage.resume.fast and storage.resume.options.fast are both set" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "old.yaml"), "--recipe", str(tmp_path / "r.yaml"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert err.count("deprecated: ") == 3 and "storage.resume.options.durable" in err


# ----------------------------------------------------------------------------- real runs
DURABLE_KILLER = """
import os, signal, sys, time
from wmtp_core import hookimpl
from wmtp_core.commit import CheckpointStore
from wmtp_core.run import main

class Killer:
    # SIGKILLs this process after training step argv[1], once run argv[3] under argv[2] has a
    # committed checkpoint
    @hookimpl
    def wmtp_step_ended(self, event):
        if event.step == int(sys.argv[1]) and "loss" in event.metrics:
            store = CheckpointStore.from_url("s3://" + sys.argv[2], skip_instance_cache=True)
            deadline = time.monotonic() + 120
            while not list(store.list(sys.argv[3])) and time.monotonic() < deadline:
                time.sleep(0.2)
                store.fs.invalidate_cache()
            os.kill(os.getpid(), signal.SIGKILL)

sys.exit(main(sys.argv[4:], plugins=(Killer(),)))
"""

RECIPE = recipe(8, optim={"lr": 0.003, "scheduler": "constant", "warmup_ratio": 0.0})


def run_config(tmp_path: Path, bucket: str, **options) -> dict:
    return {
        "seed": 5,
        "log_interval": 2,
        "mlflow": None,
        "paths": {"checkpoints": {"save_interval": 2, "keep_last": 2, "save_final": False}},
        "storage": {"resume": {"sink": "tiered", "options": {"fast": f"file://{tmp_path}/fast",
                               "durable": f"s3://{bucket}/runs", "fast_keep_last": 1, **options}}},
    }


def in_process(args, monkeypatch, capsys, cwd, plugins=()):
    from wmtp_core.run import main

    monkeypatch.chdir(cwd)
    code = main(args, plugins=plugins)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def durable_store(bucket: str, endpoint: str) -> CheckpointStore:
    return CheckpointStore.from_url(f"s3://{bucket}/runs", endpoint_url=endpoint, skip_instance_cache=True)


@pytest.mark.slow
def test_a_run_keeps_each_tier_within_its_retention_and_resumes_bit_exact_from_s3_on_a_new_machine(
        s3_server, bucket, tmp_path, monkeypatch, capsys):
    write(tmp_path / "c.yaml", run_config(tmp_path, bucket))
    write(tmp_path / "r.yaml", RECIPE)
    common = ["--config", "c.yaml", "--recipe", "r.yaml"]

    code, out, err = in_process([*common, "--run-name", "full"], monkeypatch, capsys, tmp_path)
    assert code == 0, err[-3000:]
    assert f"resume  -> tiered: s3://{bucket}/runs/full" in out
    fast = CheckpointStore.from_url(f"file://{tmp_path}/fast")
    durable = durable_store(bucket, s3_server)
    assert steps(fast, "full") == [8]  # fast_keep_last: 1
    assert steps(durable, "full") == [6, 8]  # keep_last: 2
    for path, _ in durable.list("full"):
        durable.verify(path)
    from wmtp_core.cli import main as wmtp

    assert wmtp(["checkpoints", "verify", f"s3://{bucket}/runs/full"]) == 0
    assert "2 of 2 checkpoints verified" in capsys.readouterr().out

    # killed after step 7 once a durable copy is committed: steps 2..6 were committed on the fast
    # tier, some of them copied (a slow machine may still be copying; the kill waits for one)
    cut = zygote.run(["-c", DURABLE_KILLER, "7", f"{bucket}/runs", "cut", *common, "--run-name", "cut"],
                     cwd=tmp_path, timeout=600)
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-3000:]
    assert steps(durable, "cut")  # at least one durable copy committed before the kill
    shutil.rmtree(tmp_path / "fast" / "cut")  # a new machine: the fast tier is gone

    code, out, err = in_process([*common, "--run-name", "cut", "--resume", "latest"], monkeypatch, capsys, tmp_path)
    assert code == 0, err[-3000:]
    assert f"from s3://{bucket}/runs/cut/step_" in err
    assert steps(fast, "cut") == [8]
    for path, _ in durable.list("cut"):
        durable.verify(path)

    fs = fsspec.filesystem("s3", endpoint_url=s3_server, skip_instance_cache=True)
    a = torch.load(fs.open(f"{bucket}/runs/full/step_8/model.pt"), weights_only=True)
    b = torch.load(fs.open(f"{bucket}/runs/cut/step_8/model.pt"), weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = torch.load(fs.open(f"{bucket}/runs/full/step_8/trainer.pt"), weights_only=True)["losses"]
    lb = torch.load(fs.open(f"{bucket}/runs/cut/step_8/trainer.pt"), weights_only=True)["losses"]
    assert la == lb and len(la) == 8
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in out + err


@pytest.mark.slow
def test_a_durable_copy_that_cannot_be_made_fails_the_run_and_keeps_the_fast_tier(tmp_path, monkeypatch, capsys):
    """The S3 server goes away mid-run: the copy fails after botocore's retries, the run's exit
    status is not 0, and every checkpoint committed on the fast tier is still there and verifies
    (with asynchronous saves: the failure still surfaces)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    name = f"wmtp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)

    class StopS3:
        @hookimpl
        def wmtp_step_ended(self, event):
            if event.step == 3 and "loss" in event.metrics:
                server.stop()

    config = run_config(tmp_path, name, endpoint_url=endpoint,
                        config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"}})
    config["paths"]["checkpoints"]["async"] = True  # the fast commit itself in the background too
    write(tmp_path / "c.yaml", config)
    write(tmp_path / "r.yaml", recipe(6, optim={"scheduler": "constant"}))
    try:
        code, out, err = in_process(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "down"],
                                    monkeypatch, capsys, tmp_path, plugins=(StopS3(),))
    finally:
        server.stop()
    assert code != 0, out + err
    assert "the durable copy of step 4 " in err, err[-3000:]  # said as it failed
    fast = CheckpointStore.from_url(f"file://{tmp_path}/fast")
    kept = steps(fast, "down")
    assert 4 in kept, kept  # its copy failed: the only copy is kept
    for path, _ in fast.list("down"):
        assert fast.verify(path).lineage  # every fast checkpoint is intact


def test_the_defaults_the_docs_name_are_the_ones_the_code_uses():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "storage.md").read_text()
    assert f"`fast_keep_last` defaults to {tiered.FAST_KEEP_LAST}" in doc
    assert f"{tiered.RETRIES['max_attempts']} attempts" in doc


@pytest.mark.slow
def test_two_ranks_write_shards_to_the_fast_tier_and_rank_0_copies_them_to_s3(s3_server, bucket, tmp_path):
    """FSDP: every rank writes its shards to the fast tier, rank 0 commits and copies them; the
    durable copy alone (the fast tier gone) resumes on one process."""
    import os

    config = merge(run_config(tmp_path, bucket), {"devices": {"fsdp": {"enabled": True}}})
    write(tmp_path / "c.yaml", config)
    write(tmp_path / "r4.yaml", recipe(4, optim={"lr": 0.01, "scheduler": "constant", "warmup_ratio": 0.0}))
    write(tmp_path / "r6.yaml", recipe(6, optim={"lr": 0.01, "scheduler": "constant", "warmup_ratio": 0.0}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = zygote.ranks(2, ["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r4.yaml", "--run-name", "d"],
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    durable = durable_store(bucket, s3_server)
    assert steps(durable, "d") == [2, 4] and steps(CheckpointStore.from_url(f"file://{tmp_path}/fast"), "d") == [4]
    for path, m in durable.list("d"):
        durable.verify(path)
        names = {e.path for e in m.files}
        assert m.meta["format"] == "dcp" and ".metadata" in names and sum(n.endswith(".distcp") for n in names) == 2

    shutil.rmtree(tmp_path / "fast" / "d")
    one = zygote.run(["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r6.yaml", "--run-name", "d",
                      "--resume", "latest"], cwd=tmp_path, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-4000:]
    assert f"from s3://{bucket}/runs/d/step_4" in one.stderr
    assert steps(durable, "d")[-1] == 6


def test_a_durable_tier_that_does_not_answer_stops_the_run_before_step_1_with_exit_1_as_the_docs_say(
        tmp_path, monkeypatch, capsys):
    from conftest import free_port

    from wmtp_core.exits import EXIT_FAILED

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = f"http://127.0.0.1:{free_port()}"
    config = run_config(tmp_path, "nobucket", endpoint_url=endpoint, config_kwargs={"retries": {"max_attempts": 1}})
    write(tmp_path / "c.yaml", config)
    write(tmp_path / "r.yaml", recipe(4))
    code, out, err = in_process(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "dead"],
                                monkeypatch, capsys, tmp_path)
    assert code == EXIT_FAILED, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    flat = " ".join(err.split())
    assert flat.startswith("error: reading the resume storage s3://nobucket/runs/dead failed (taking the run's "
                           "lease, finding or loading its checkpoint): EndpointConnectionError"), flat
    assert "Traceback" not in err and not list((tmp_path / "fast").rglob("step_*"))
    doc = " ".join((Path(__file__).resolve().parent.parent / "docs" / "storage.md").read_text().split())
    assert ("`error: reading the resume storage s3://.../<run> failed (taking the run's lease, finding or "
            "loading its checkpoint): EndpointConnectionError: ...`, exit status 1") in doc


# ----------------------------------------------------------------------------- wmtp report on a tiered run
@pytest.mark.slow
def test_the_report_finds_a_tiered_run_by_name_counts_both_tiers_and_the_mlflow_picture_agrees(
        s3_server, bucket, tmp_path, monkeypatch, capsys):
    """``wmtp report NAME`` finds the run under the durable tier, labels the sink ``tiered``,
    counts the copies of both tiers; the MLflow run's storage picture ends on the same bytes."""
    import io
    import json

    import mlflow
    from PIL import Image

    from wmtp_core.cli import main as wmtp

    config = run_config(tmp_path, bucket)
    config["mlflow"] = {"experiment": "tiered", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    write(tmp_path / "c.yaml", config)
    write(tmp_path / "r.yaml", recipe(4, optim={"scheduler": "constant"}))
    code, out, err = in_process(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "tr"],
                                monkeypatch, capsys, tmp_path)
    assert code == 0, err[-3000:]
    fast = CheckpointStore.from_url(f"file://{tmp_path}/fast")
    durable = durable_store(bucket, s3_server)
    assert steps(durable, "tr") == [2, 4] and steps(fast, "tr") == [4]
    both = sum(m.nbytes for _, m in durable.list("tr")) + sum(m.nbytes for _, m in fast.list("tr"))

    assert wmtp(["report", "tr", "--config", "c.yaml", "--price-per-gb-month", "0.023", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["uri"] == f"s3://{bucket}/runs/tr"
    assert report["resume"]["sink"] == "tiered"
    assert report["resume"]["committed"] == 3 and report["resume"]["bytes"] == both == report["total_bytes"]
    assert [(p["uri"], p["committed"]) for p in report["resume"]["places"]] == [
        (f"s3://{bucket}/runs/tr", 2), (f"{tmp_path}/fast/tr", 1)]
    storage = report["storage"]
    assert storage["held_bytes"] == both and storage["note"] == "" and storage["saves"] == 2

    assert wmtp(["report", "tr", "--config", "c.yaml"]) == 0
    text = capsys.readouterr().out
    assert f"Bytes held by run 'tr' (s3://{bucket}/runs/tr):" in text
    assert f"resume  tiered  2 committed, newest step 4 in s3://{bucket}/runs/tr" in text
    assert f"resume  tiered  1 committed, newest step 4 in {tmp_path}/fast/tr" in text

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiered").experiment_id])
    local = client.download_artifacts(run.info.run_id, "wmtp-storage.png", str(tmp_path / "dl"))
    drawn = json.loads(Image.open(io.BytesIO(Path(local).read_bytes())).text["wmtp-storage"])
    assert drawn["held_bytes"] == drawn["resume_bytes"] == both
    assert drawn["dual_writer_bytes"] == storage["dual_writer_bytes"]
