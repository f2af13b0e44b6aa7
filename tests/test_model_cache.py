"""The node-local model cache (:mod:`wmtp_core.model_cache`): a model on S3 read by two processes
at once is fetched from S3 once; a model that changed on S3 (same name, other bytes) is fetched
again and its new weights used; a cached file that was truncated or rewritten is found and
fetched again; a failed download leaves no record and no file; a cache without room is one
line; ``models:/`` folders are downloaded once; old entries are evicted. Against the tests'
loopback S3 server (moto); what a process downloads is observed in it (s3fs's ``_get_file``)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file

import zygote
from hf_models import causal_lm

from wmtp_core import model_cache
from wmtp_core.engine import hf
from wmtp_core.errors import ModelLoadError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A cache of this test's own."""
    monkeypatch.setenv("WMTP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def _upload(local: Path, url: str) -> None:
    fsspec.filesystem("s3", skip_instance_cache=True).put(f"{local}/", url, recursive=True)


def _copy(url: str) -> str:
    """What a run does with ``paths.models.base: url``: inspect the folder, then its local copy."""
    info = hf.inspect(url, "paths.models.base")
    return hf.local_copy(info, {"skip_instance_cache": True})


READ = """
import json, sys, time
import s3fs
from wmtp_core.engine import hf
fetched, original = [], s3fs.S3FileSystem._get_file

async def counted(self, rpath, lpath, *a, **kw):  # what this process downloads whole, the weights
    fetched.append(rpath)                         # slowed down: the other process comes meanwhile
    if rpath.endswith("model.safetensors"):
        time.sleep(1.0)
    return await original(self, rpath, lpath, *a, **kw)

s3fs.S3FileSystem._get_file = counted
info = hf.inspect(sys.argv[1], "paths.models.base", storage_options={"skip_instance_cache": True})
began = time.time()
folder = hf.local_copy(info, {"skip_instance_cache": True})
print(json.dumps({"folder": folder, "fetched": fetched, "span": [began, time.time()]}))
"""


def test_two_processes_reading_one_model_on_s3_fetch_it_once(s3_server, bucket, tmp_path, cache):
    """Started together: one downloads (each file slowed by a second) while the other waits on
    the entry's lock, then reuses it."""
    local = causal_lm(tmp_path / "model")
    url = f"s3://{bucket}/models/tiny"
    _upload(local, url)
    children = [zygote.Child(["-c", READ, url], tmp_path) for _ in range(2)]
    done = [c.communicate(120) + (c.returncode,) for c in children]
    for out, err, code in done:
        assert code == 0, (out[-2000:], err[-3000:])
    said = [json.loads(out.strip().splitlines()[-1]) for out, _, _ in done]
    (folder,) = {s["folder"] for s in said}
    fetched = [f for s in said for f in s["fetched"]]
    assert [f for f in fetched if f.endswith("model.safetensors")] == [f"{bucket}/models/tiny/model.safetensors"], \
        fetched
    assert len(fetched) == len(os.listdir(folder)), "a file was fetched by both processes"
    (a, b), (c, d) = sorted(s["span"] for s in said)
    assert c < b, "the two processes did not read the model at the same time"
    assert folder.startswith(str(cache)) and model_cache.holds(folder)
    assert (Path(folder) / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    record = json.loads((Path(folder).parent / "record.json").read_text())
    assert record["files"]["model.safetensors"]["source_version"], "no ETag in the record"


def test_a_model_changed_on_s3_is_fetched_again_and_its_new_weights_used(s3_server, bucket, tmp_path):
    url = f"s3://{bucket}/models/tiny"
    first = causal_lm(tmp_path / "first", seed=0)
    _upload(first, url)
    folder = _copy(url)
    assert load_file(f"{folder}/model.safetensors").keys() == load_file(first / "model.safetensors").keys()
    assert _copy(url) == folder  # the same entry, reused
    second = causal_lm(tmp_path / "second", seed=1)  # same names, same sizes, other bytes
    assert (first / "model.safetensors").stat().st_size == (second / "model.safetensors").stat().st_size
    _upload(second, url)
    again = _copy(url)
    new, old = load_file(f"{again}/model.safetensors"), load_file(second / "model.safetensors")
    assert all(torch.equal(new[k], old[k]) for k in old), "a changed model was served from a stale cache"


@pytest.mark.parametrize("damage", ["truncated", "a byte flipped"])
def test_a_damaged_cached_file_is_found_and_fetched_again(s3_server, bucket, tmp_path, monkeypatch, damage):
    local = causal_lm(tmp_path / "model")
    url = f"s3://{bucket}/models/tiny"
    _upload(local, url)
    folder = _copy(url)
    cached = Path(folder) / "model.safetensors"
    time.sleep(0.02)  # past the filesystem clock's tick: a rewrite in the tick of the download keeps its mtime
    with open(cached, "r+b") as f:
        if damage == "truncated":
            f.truncate(cached.stat().st_size // 2)
        else:
            f.seek(cached.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    downloads = []
    download = model_cache._download
    monkeypatch.setattr(model_cache, "_download", lambda entry, *a: downloads.append(entry) or download(entry, *a))
    assert _copy(url) == folder
    assert downloads, "a damaged cached file was reused"
    assert cached.read_bytes() == (local / "model.safetensors").read_bytes()


def test_a_failed_download_leaves_no_record_and_no_file_and_the_next_try_starts_over(cache):
    calls = []

    def failing(name, path):
        calls.append(name)
        Path(path).write_bytes(b"partial")
        if name == "b":
            raise OSError("connection reset")

    listing = {"a": {"size": 7, "version": "1"}, "b": {"size": 7, "version": "1"}}
    with pytest.raises(OSError, match="connection reset"):
        model_cache.cached("s3://x/m", listing, failing, "s3://x/m")
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["lock"], "a failed download left files or a record"

    def fine(name, path):
        calls.append(name)
        Path(path).write_bytes(b"partial")

    folder = model_cache.cached("s3://x/m", listing, fine, "s3://x/m")
    assert calls == ["a", "b", "a", "b"] and sorted(os.listdir(folder)) == ["a", "b"]
    assert model_cache.cached("s3://x/m", listing, fine, "s3://x/m") == folder and len(calls) == 4


def test_a_cache_without_room_is_one_line_naming_the_directory_and_the_bytes(cache):
    huge = {"model.safetensors": {"size": 1 << 60, "version": "1"}}
    with pytest.raises(ModelLoadError) as raised:
        model_cache.cached("s3://x/huge", huge, lambda n, p: None, "s3://x/huge")
    line = str(raised.value)
    assert "\n" not in line and f"the model cache {cache} has" in line and f"s3://x/huge needs {1 << 60}" in line
    assert "WMTP_CACHE_DIR" in line and f"rm -rf {cache}" in line


def test_entries_not_read_for_days_are_evicted_unless_in_use(cache, monkeypatch):
    write = lambda name, path: Path(path).write_bytes(b"x")  # noqa: E731
    listing = {"f": {"size": 1, "version": "1"}}
    old, used, busy = (Path(model_cache.cached(k, listing, write, k)).parent for k in ("old", "used", "busy"))
    month_ago = time.time() - 31 * 86400
    for entry in (old, busy):
        os.utime(entry / "record.json", (month_ago, month_ago))
    with model_cache._locked(str(busy / "lock")):  # a reader holds it
        assert model_cache.evict() == [str(old)]
    assert not (old / "record.json").exists() and not (old / "files").exists()
    assert (used / "files" / "f").exists() and (busy / "files" / "f").exists()
    monkeypatch.setenv("WMTP_MODEL_CACHE_DAYS", "0")
    assert model_cache.evict() == []


def test_a_registered_hugging_face_model_is_downloaded_once_and_kept(tmp_path, monkeypatch):
    import mlflow

    from conftest import migrated_mlflow_db, mlflow_environment_restored
    from wmtp_plugins import _safe_models

    store = migrated_mlflow_db(tmp_path / "mlflow.db")
    with mlflow_environment_restored():
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("cache", f"file://{tmp_path}/artifacts"))
        art = tmp_path / "art"
        art.mkdir()
        (art / "MLmodel").write_text("flavors:\n  transformers:\n    model_binary: model\n    task: text-generation\n")
        causal_lm(art / "model")
        with mlflow.start_run():
            mlflow.log_artifacts(str(art), "model")
            run = mlflow.active_run().info
        mlflow.register_model(f"runs:/{run.run_id}/model", "cached")
        downloads = []
        original = _safe_models._download_one
        monkeypatch.setattr(_safe_models, "_download_one", lambda u, p, lp: downloads.append(p) or original(u, p, lp))
        _, _, folder = _safe_models.load("models:/cached/1")
        n = len(downloads)
        assert n >= 2 and model_cache.holds(folder), (downloads, folder)
        _, _, again = _safe_models.load("models:/cached/latest")  # the same version: the same entry
        assert again == folder and len(downloads) == n, downloads
    assert (Path(folder) / "model.safetensors").read_bytes() == (art / "model" / "model.safetensors").read_bytes()
    assert not [p for p in Path(folder).iterdir() if p.name.endswith((".py", ".bin", ".pkl"))]
    from wmtp_core.engine.model_sources import _temporary

    assert not _temporary(folder, "models:/cached/1"), "a reader would remove the cached folder"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
