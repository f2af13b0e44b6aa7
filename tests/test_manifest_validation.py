"""A manifest is validated before it is believed; gc deletes only what WMTP wrote; a sharded
checkpoint's metadata and objects are read without running code."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
from builders import resume_files
from conftest import tree
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wmtp_core import Role
from wmtp_core.cli import main as cli_main
from wmtp_core.commit import CheckpointError, CheckpointStore
from wmtp_core.errors import ManifestError
from wmtp_core.manifest import Manifest

OLD = time.time() - 7200


def commit(store, run, step, lineage="L1"):
    files = resume_files(step)
    return store.write(run, f"step_{step}", files, step=step, role=Role.RESUME, lineage=lineage,
                       meta={"algo": "baseline-mtp", "metrics": {"loss": 1.5}})


def cli(capsys, *args):
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ----------------------------------------------------------------------------- the reported cases
def _not_json(m):
    return "{"


def _truncated(m):
    return json.dumps(m)[:40]


BROKEN = {
    "not JSON": (_not_json, "is not valid JSON"),
    "truncated": (_truncated, "is not valid JSON"),
    "format_version 3": (lambda m: {**m, "format_version": 3}, "format_version 3 is not supported"),
    "format_version 1 with a blake3 entry": (lambda m: {**m, "format_version": 1}, "unknown key 'hash'"),
    "size -1": (lambda m: {**m, "files": [{**m["files"][0], "size": -1}, *m["files"][1:]]},
                "size: -1 is not an integer >= 0"),
    "files null": (lambda m: {**m, "files": None}, "files is None, not a list"),
    "files []": (lambda m: {**m, "files": []}, "lists at least one file"),
    "an entry dropped": (lambda m: {**m, "files": m["files"][:1]}, "which its manifest does not name"),
    "../ path": (lambda m: {**m, "files": [*m["files"], {**m["files"][0], "path": "../step_4/model.pt"}]},
                 "'../step_4/model.pt' is not a relative path inside the checkpoint"),
    "absolute path": (lambda m: {**m, "files": [{**m["files"][0], "path": "/etc/passwd"}, *m["files"][1:]]},
                      "'/etc/passwd' is not a relative path inside the checkpoint"),
    "step 600 in step_6": (lambda m: {**m, "step": 600}, "says resume step 600 but the directory is step_6"),
}


@pytest.fixture
def base(tmp_path):
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    commit(store, "a", 4)
    commit(store, "a", 6)
    return tmp_path / "ck"


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_manifest_is_unverifiable_everywhere(base, capsys, case):
    mutate, reason = BROKEN[case]
    path = base / "a" / "step_6" / "manifest.json"
    path.write_text((lambda v: v if isinstance(v, str) else json.dumps(v))(mutate(json.loads(path.read_text()))))
    store = CheckpointStore.from_url(f"file://{base}")

    # verify: exit 1, the reason named; never "2 of 2"
    code, out, _ = cli(capsys, "checkpoints", "verify", base / "a")
    assert code == 1
    assert "1 of 2 checkpoints verified" in out
    assert f"FAILED  {base}/a/step_6" in out and reason in " ".join(out.split())
    assert cli(capsys, "checkpoints", "verify", base / "a" / "step_6")[0] == 1

    # ls shows it as unverifiable, with the reason
    code, out, _ = cli(capsys, "checkpoints", "ls", base / "a", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["step_6"]["state"] == "unverifiable" and reason in rows["step_6"]["problem"]

    # retention and "latest" never count it
    assert [m.step for _, m in store.list("a")] == [4]

    # resume skips it with the reason and falls back
    from rich.console import Console

    from wmtp_core.events import RunInfo, SinkContext
    from wmtp_core.filesink import FileSink
    from wmtp_core.resume import find_resume as _find_resume

    sink = FileSink(SinkContext(role=Role.RESUME, run=RunInfo(name="a", algo="baseline-mtp", lineage="L1"),
                                base_path=f"file://{base}"))
    uri, manifest = _find_resume(sink, "latest", Console(stderr=True, soft_wrap=True, width=400))
    err = " ".join(capsys.readouterr().err.split())
    assert manifest.step == 4 and uri.endswith("step_4")
    assert f"skipping {base}/a/step_6" in err and reason in err


def test_verify_never_reads_outside_the_checkpoint(base, capsys):
    """An entry naming ../step_4/model.pt with that file's real size and hash would 'verify'
    by reading another checkpoint's file: refused before any file is opened."""
    manifest = base / "a" / "step_6" / "manifest.json"
    m = json.loads(manifest.read_text())
    other = json.loads((base / "a" / "step_4" / "manifest.json").read_text())["files"][0]
    m["files"].append({**other, "path": "../step_4/model.pt"})
    manifest.write_text(json.dumps(m))
    code, out, _ = cli(capsys, "checkpoints", "verify", base / "a" / "step_6")
    assert code == 1 and "is not a relative path inside the checkpoint" in out


def test_a_link_leading_out_of_the_checkpoint_is_refused(base, capsys, tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"not a checkpoint")
    target = base / "a" / "step_6" / "trainer.pt"
    data = target.read_bytes()
    outside.write_bytes(data)  # the same bytes: only the link gives it away
    target.unlink()
    target.symlink_to(outside)
    code, out, _ = cli(capsys, "checkpoints", "verify", base / "a" / "step_6")
    assert code == 1 and "trainer.pt is a link" in out


# ----------------------------------------------------------------------------- the property
IDENTITY = ("format_version", "run", "step", "role", "lineage")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
paths = st.sampled_from(["model.pt", "trainer.pt", "../step_4/model.pt", "/etc/passwd", "./model.pt",
                         "model.pt/", "a/../model.pt", "", ".", "..", "manifest.json", "MODEL.PT",
                         "model.pt\x00", "C:model.pt", "sub/model.pt", "model.pt ", "\\model.pt"])


def identity(m: Manifest):
    return tuple(getattr(m, f) for f in IDENTITY) + (frozenset(m.files),)


@st.composite
def mutations(draw, original: dict):
    m = json.loads(json.dumps(original))
    kind = draw(st.sampled_from(["field", "typed", "delete", "extra", "file", "files", "text"]))
    if kind == "field":  # any JSON value in a checked field
        m[draw(st.sampled_from(["format_version", "run", "step", "role", "files", "meta"]))] = draw(json_values)
    elif kind == "typed":  # near misses of the right type
        field, value = draw(st.sampled_from([
            ("step", 5), ("step", 7), ("step", 600), ("step", -6), ("step", "6"), ("step", 6.0),
            ("step", True), ("step", 6), ("run", "b"), ("run", "../a"), ("run", ""), ("run", "a\n"),
            ("run", "a"), ("role", "final"), ("role", "RESUME"), ("role", "resume"), ("role", ""),
            ("format_version", 0), ("format_version", 1), ("format_version", 3), ("format_version", "2"),
            ("format_version", 2.0), ("format_version", True), ("format_version", 2), ("hash", "sha256"),
            ("hash", "md5"), ("hash", None), ("hash", "blake3"), ("lineage", None), ("lineage", ""),
            ("lineage", 7), ("lineage", ["L1"]), ("lineage", "L1/../x"), ("lineage", "L1"),
            ("created_at", "yesterday"), ("created_at", None), ("created_at", 3), ("meta", None),
            ("meta", []), ("meta", {"format": "zip"}), ("meta", {"format": "dcp"}),
            ("meta", {"metrics": {"loss": "low"}}), ("meta", {"algo": 3})]))
        m[field] = value
    elif kind == "delete":
        del m[draw(st.sampled_from(sorted(m)))]
    elif kind == "extra":
        m[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in m))] = draw(json_values)
    elif kind == "file":
        i = draw(st.integers(0, len(m["files"]) - 1))
        key = draw(st.sampled_from(["path", "size", "digest", "extra", "drop-key"]))
        entry = m["files"][i]
        if key == "path":
            entry["path"] = draw(paths)
        elif key == "size":
            entry["size"] = draw(st.one_of(st.integers(-2, entry["size"] + 2), json_values))
        elif key == "digest":
            entry["digest"] = draw(st.one_of(
                st.just(entry["digest"].upper()), st.just(m["files"][1 - i]["digest"]),
                st.text(alphabet="0123456789abcdef", min_size=63, max_size=65), json_values))
        elif key == "extra":
            entry["extra"] = 1
        else:
            del entry[draw(st.sampled_from(sorted(entry)))]
    elif kind == "files":
        how = draw(st.sampled_from(["drop", "duplicate", "swap-sizes", "reverse"]))
        if how == "drop":
            del m["files"][draw(st.integers(0, len(m["files"]) - 1))]
        elif how == "duplicate":
            m["files"].append(dict(m["files"][0]))
        elif how == "swap-sizes":
            a, b = m["files"][:2]
            a["size"], b["size"] = b["size"], a["size"]
        else:
            m["files"].reverse()
    else:
        text = json.dumps(original)
        return draw(st.sampled_from(["{", "", "null", "[]", "\"manifest\"", text[: len(text) // 2],
                                     text + "x", "{" * 5000]))
    return m


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@example(data=None)
def test_no_mutation_of_a_manifest_verifies_unless_it_leaves_the_manifest_equivalent(data):
    """A manifest changed in any field, type, path or step verifies only if what it says about
    the checkpoint (format, run, step, role, lineage, files) is unchanged."""
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore.from_url(f"file://{tmp}")
        original = commit(store, "a", 6)
        path = store.path_of("a", "step_6")
        raw = json.loads(Path(path, "manifest.json").read_text())
        if data is None:  # the untouched manifest verifies (the property is not vacuous)
            assert store.verify(path) == original
            return
        mutated = data.draw(mutations(raw))
        Path(path, "manifest.json").write_text(mutated if isinstance(mutated, str) else json.dumps(mutated))
        try:
            verified = store.verify(path)
        except CheckpointError:
            return
        assert identity(verified) == identity(original), mutated


def test_the_schema_refuses_what_from_json_is_given_directly():
    with pytest.raises(ManifestError, match="unknown key 'extra'"):
        Manifest.from_json({"format_version": 1, "run": "a", "step": 1, "role": "resume", "lineage": "L",
                            "created_at": "2026-01-01T00:00:00", "files": [], "extra": 1})
    with pytest.raises(ManifestError, match="required key 'lineage' is missing"):
        Manifest.from_json({"format_version": 1, "run": "a", "step": 1, "role": "resume",
                            "created_at": "2026-01-01T00:00:00", "files": []})


# ----------------------------------------------------------------------------- gc ownership
def test_gc_removes_only_what_wmtp_wrote_and_lists_the_rest_as_not_ours(tmp_path, capsys):
    base = tmp_path / "ck"
    store = CheckpointStore.from_url(f"file://{base}")
    commit(store, "r", 2)
    staging = store.prepare("r", "step_8")  # a WMTP save that never finished
    Path(staging, "model.pt").write_bytes(b"half")
    foreign = {base / "r" / "step_100" / "pytorch_model.bin": b"another tool's weights",
               base / "r" / "final" / "weights.safetensors": b"someone's final model",
               base / "other" / "step_3" / "adapter.bin": b"a third tool"}
    for path, data in foreign.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for p in list(base.rglob("*")):
        os.utime(p, (OLD, OLD))

    code, out, _ = cli(capsys, "checkpoints", "ls", base, "--json")
    states = {(r["run"], r["name"]): r["state"] for r in json.loads(out)}
    assert states[("r", "step_100")] == states[("r", "final")] == "foreign"
    assert states[("r", "step_8")] == "staging"

    code, out, _ = cli(capsys, "gc", base, "--min-age", "0")
    assert code == 0
    for path, data in foreign.items():
        assert path.read_bytes() == data, f"gc deleted {path}"
        assert f"kept    {path.parent}: not ours" in out
    assert not Path(staging).exists()
    assert f"removed {staging}" in out
    assert cli(capsys, "checkpoints", "verify", base / "r")[0] == 0


def test_a_save_never_overwrites_a_directory_it_did_not_write(tmp_path):
    store = CheckpointStore.from_url(f"file://{tmp_path}")
    foreign = tmp_path / "r" / "step_2" / "pytorch_model.bin"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"keep me")
    before = tree(tmp_path)
    with pytest.raises(CheckpointError, match="was not written by WMTP"):
        commit(store, "r", 2)
    assert tree(tmp_path) == before and foreign.read_bytes() == b"keep me"


# ----------------------------------------------------------------------------- sharded loading
class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_a_sharded_checkpoint_s_metadata_and_objects_never_run_code(tmp_path):
    """DCP reads ``.metadata`` with plain pickle and non-tensor items without weights_only. A
    sharded checkpoint whose files (and manifest) an attacker wrote is refused by the sink with
    one clear error, and nothing it holds runs."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from wmtp_core.events import RunInfo, SinkContext
    from wmtp_core.filesink import FileSink

    marker = tmp_path / "marker"
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    run = RunInfo(name="r", algo="baseline-mtp", lineage="L1")
    sink = FileSink(SinkContext(role=Role.RESUME, run=run, base_path=f"file://{tmp_path}/ck"))

    def sharded(step, state, metadata=None):
        path = store.prepare("r", f"step_{step}")
        dcp.save(state, checkpoint_id=path, no_dist=True)
        torch.save({"step": step}, f"{path}/trainer_rank0.pt")
        if metadata is not None:
            Path(path, ".metadata").write_bytes(metadata)
        store.commit_existing("r", f"step_{step}", step=step, role=Role.RESUME, lineage="L1",
                              meta={"format": "dcp", "world_size": 1})
        return store.uri(path)

    good = sharded(2, {"w": torch.arange(4.0), "lr": 0.5})
    loaded = sink.load(good)
    state = {"w": torch.zeros(4), "lr": 0.0}
    dcp.load(state, storage_reader=loaded.shards, no_dist=True)
    assert torch.equal(state["w"], torch.arange(4.0)) and state["lr"] == 0.5

    bad_meta = sharded(4, {"w": torch.arange(4.0)}, metadata=pickle.dumps(Exploit(str(marker))))
    with pytest.raises(CheckpointError, match=r"\.metadata was refused.*it names builtins.exec"):
        sink.load(bad_meta)
    assert not marker.exists()

    bad_item = sharded(6, {"w": torch.arange(4.0), "obj": Exploit(str(marker))})
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"\(obj\) was refused by weights-only loading"):
        sink.load(bad_item)
    assert not marker.exists()

    # metadata that points DCP at a file outside the checkpoint is refused too
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    meta = pickle.loads(Path(good.replace("step_2", "step_2"), ".metadata").read_bytes())
    for index, info in list(meta.storage_data.items()):
        meta.storage_data[index] = _StorageInfo("../step_4/__0_0.distcp", info.offset, info.length)
    outside = sharded(8, {"w": torch.arange(4.0), "lr": 0.5}, metadata=pickle.dumps(meta))
    with pytest.raises(CheckpointError, match="not a file of this checkpoint"):
        sink.load(outside)
