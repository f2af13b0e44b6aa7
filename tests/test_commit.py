"""The commit protocol on real files: manifest last, verification, staging, safe loading."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from wmtp_core import ConfigError, Role
from wmtp_core.commit import CheckpointError, CheckpointStore, check_run_name
from wmtp_core.filesink import torch_writer
from wmtp_core.safe_load import load_part


@pytest.fixture
def store(tmp_path):
    return CheckpointStore.from_url(f"file://{tmp_path}/base")


def write(store, step, run="r", lineage="L", files=None):
    files = files or {"model.pt": torch_writer({"w": torch.arange(10.0) * step})}
    return store.write(run, f"step_{step}", files, step=step, role=Role.RESUME, lineage=lineage)


def test_manifest_records_every_file_with_size_and_its_blake3(store):
    import blake3

    m = write(store, 3)
    path = store.path_of("r", "step_3")
    on_disk = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert on_disk["step"] == 3 and on_disk["run"] == "r" and on_disk["format_version"] == 2
    assert on_disk["hash"] == "blake3"
    (entry,) = on_disk["files"]
    data = open(os.path.join(path, "model.pt"), "rb").read()
    assert entry == {"path": "model.pt", "size": len(data), "digest": blake3.blake3(data).hexdigest()}
    assert store.verify(path) == m


def test_a_manifest_of_format_1_with_sha256_keeps_verifying(store):
    """Checkpoints committed before the move to BLAKE3 name sha256 digests: still verified."""
    import hashlib

    write(store, 3)
    path = store.path_of("r", "step_3")
    target = os.path.join(path, "model.pt")
    data = open(target, "rb").read()
    manifest_path = os.path.join(path, "manifest.json")
    v2 = json.loads(open(manifest_path).read())
    v1 = {k: v for k, v in v2.items() if k != "hash"} | {
        "format_version": 1,
        "files": [{"path": "model.pt", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}
    open(manifest_path, "w").write(json.dumps(v1))
    m = store.verify(path)
    assert m.format_version == 1 and m.files[0].algorithm == "sha256"
    assert store.read_verified(path)[1]["model.pt"] == data
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    open(target, "wb").write(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"model.pt does not match the manifest \(.*sha256"):
        store.verify(path)


def test_only_directories_with_a_manifest_are_checkpoints(store):
    write(store, 1)
    staging = store.prepare("r", "step_2")  # a save that never reached its manifest
    open(os.path.join(staging, "model.pt"), "wb").write(b"half")
    write(store, 3)
    os.remove(os.path.join(store.path_of("r", "step_3"), "manifest.json"))  # not WMTP's any more
    assert [m.step for _, m in store.list("r")] == [1]
    assert store.staging("r") == [staging]
    assert [(os.path.basename(i.path), i.state) for i in store.inspect("r")] == [
        ("step_1", "committed"), ("step_2", "staging"), ("step_3", "foreign")]


def test_a_committed_checkpoint_carries_no_staging_marker_and_delete_marks_before_uncommitting(store):
    write(store, 1)
    path = store.path_of("r", "step_1")
    assert sorted(os.listdir(path)) == ["manifest.json", "model.pt"]
    seen = []
    real = store.fs.rm_file

    def spy(p):  # the state the directory is in when the manifest goes
        if p.endswith("manifest.json"):
            seen.append(sorted(os.listdir(path)))
        return real(p)

    store.fs.rm_file = spy
    store.delete(path)
    assert seen == [[".wmtp-staging", "manifest.json", "model.pt"]]
    assert not os.path.exists(path)


def test_a_crash_before_the_manifest_leaves_no_checkpoint(store):
    def crash(stream):
        stream.write(b"partial")
        raise RuntimeError("killed mid-file")

    write(store, 1)
    with pytest.raises(RuntimeError):
        store.write("r", "step_2", {"a.pt": torch_writer(1), "b.pt": crash}, step=2,
                    role=Role.RESUME, lineage="L")
    assert [m.step for _, m in store.list("r")] == [1]
    # the next save of that step clears the leftover staging
    write(store, 2)
    assert [m.step for _, m in store.list("r")] == [1, 2]


def test_a_flipped_byte_is_detected_and_named(store):
    write(store, 5)
    path = store.path_of("r", "step_5")
    target = os.path.join(path, "model.pt")
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(target, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.pt does not match the manifest"):
        store.verify(path)
    with pytest.raises(CheckpointError, match=r"model.pt does not match the manifest"):
        store.read_verified(path)


def test_a_failed_save_returns_the_space_of_its_removed_files_before_it_raises(store):
    """The files already written are hashed on helper threads: a later file's failure waits for
    them, so no removed file is still held open (its space in use) once the save has failed."""
    class failing_after_writing:
        def __call__(self, stream):
            raise OSError(28, "No space left on device")

        def save_to_path(self, path):
            self(None)

    big = torch_writer({"w": torch.zeros(96 << 18)})  # 96 MiB: hashing it outlasts the failure
    with pytest.raises(Exception, match="disk is full|No space"):
        store.write("r", "step_1", {"a.pt": big, "b.pt": failing_after_writing()}, step=1,
                    role=Role.RESUME, lineage="L")
    staging = store.path_of("r", "step_1")
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [h for h in held if h.startswith(staging)], held
    assert not os.path.exists(staging)


def test_committed_checkpoint_is_never_overwritten(store):
    write(store, 1)
    with pytest.raises(CheckpointError, match="already committed"):
        write(store, 1)


def test_delete_uncommits_first(store):
    write(store, 1)
    path = store.path_of("r", "step_1")
    store.delete(path)
    assert not os.path.exists(path)
    assert store.list("r") == []


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/wmtp-pwned",))


def test_a_crafted_pickle_does_not_run(tmp_path):
    if os.path.exists("/tmp/wmtp-pwned"):
        os.remove("/tmp/wmtp-pwned")
    buf = io.BytesIO()
    torch.save({"w": Exploit()}, buf)
    with pytest.raises(CheckpointError, match="refused by weights-only loading.*it names posix.system") as e:
        load_part(buf.getvalue(), "step_2/model.pt")
    assert str(e.value).startswith("step_2/model.pt was refused") and "\n" not in str(e.value)
    assert "weights_only` set to `False`" not in str(e.value) and "safe_globals" not in str(e.value)
    assert not os.path.exists("/tmp/wmtp-pwned")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 200, "a..b"])
def test_run_names_cannot_escape(name):
    with pytest.raises(ConfigError, match="not allowed"):
        check_run_name(name)
