"""What ``benchmarks/peers.py`` measures of one run of one side (issue 21): the bytes it holds
(local files and S3 objects, classified and deduplicated), the bytes it wrote through a counting
proxy in front of the loopback S3 server, its newest checkpoint corrupted three ways, and its
registered final model (counted, loaded with ``mlflow.transformers.load_model``, searched for
optimizer state)."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from faultproxy import FaultProxy, _Handler  # noqa: E402

BIG = 64 * 2**20
"""Files above this are keyed by size and their first and last MiB, not by a full sha256."""
HARNESS_FILES = re.compile(r"^((spec|result)[^/]*\.json|[^/]*\.log|final[^/]*\.safetensors|[cr]\.yaml)$")
HARNESS_DIRS = ("base-model/", "registered/")
"""The workload's input model folder and the harness's own files: not the tool's storage."""
CKPT_UNIT = re.compile(r"^(.*?(?:step_|checkpoint-)(\d+))/|^(.*?\.ckpt)$")
RESUME_PATH = re.compile(r"(^|/)(step_\d+|checkpoint-\d+)/|\.ckpt$")
"""A checkpoint the tool keeps outside ``checkpoint_uri`` (the HF Trainer's local output_dir
when the store is S3)."""
LOGGED_MODEL = re.compile(r"^(.*/models/m-[0-9a-f]+/)")
MLFLOW_CKPT = re.compile(r"(\.ckpt$|(^|/)checkpoint-\d+/|(^|/)step_\d+/|(^|/)checkpoints?/)")
OPTIMIZER = re.compile(r"optimi[sz]er|exp_avg|scheduler\.pt|rng_state", re.I)


# --------------------------------------------------------------------------- the S3 proxy
class CountingProxy(FaultProxy):
    """``FaultProxy(upstream, rate=0)`` that also counts the body bytes of every PUT and POST
    (UploadPart included) it forwards: :attr:`put_bytes`."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, rate=0.0)
        self.put_bytes = 0
        self._count_lock = threading.Lock()

    def start(self) -> CountingProxy:
        from faultproxy import _Server

        proxy = self

        class Handler(_Handler):
            owner = proxy

            def _body(self) -> bytes:
                body = super()._body()
                if self.command in ("PUT", "POST"):
                    with proxy._count_lock:
                        proxy.put_bytes += len(body)
                return body

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="countingproxy", daemon=True)
        self._thread.start()
        return self


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


# --------------------------------------------------------------------------- what is held
def local_files(root: str) -> list[tuple[str, str, int]]:
    """``(uri, path relative to root, size)`` of every file under ``root``."""
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append((p, os.path.relpath(p, root), os.path.getsize(p)))
    return out


def s3_objects(endpoint: str, bucket: str) -> list[tuple[str, str, int]]:
    """``(s3 uri, key, size)`` of every object in ``bucket``."""
    out = []
    for page in s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out += [(f"s3://{bucket}/{o['Key']}", o["Key"], o["Size"]) for o in page.get("Contents", [])]
    return out


def content_key(uri: str, size: int, endpoint: str | None) -> str:
    """sha256 of the content, or for a file above :data:`BIG` of its size, first and last MiB."""
    h = hashlib.sha256()
    ranges = [(0, size)] if size <= BIG else [(0, 2**20), (size - 2**20, size)]
    if size > BIG:
        h.update(str(size).encode())
    for start, end in ranges:
        h.update(read_range(uri, start, end, endpoint))
    return h.hexdigest()


def read_range(uri: str, start: int, end: int, endpoint: str | None) -> bytes:
    if uri.startswith("s3://"):
        bucket, key = uri[5:].split("/", 1)
        if end <= start:
            return b""
        body = s3_client(endpoint).get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
        return body.read()
    with open(uri, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def classify(uri: str, rel: str, spec: dict) -> str:
    """``resume`` (the tool's checkpoints), ``resume-mlflow`` (a checkpoint's copy in MLflow),
    ``final`` (MLflow's model artifacts), ``harness`` (not the tool's) or ``other``."""
    if HARNESS_FILES.search(rel) or rel.startswith(HARNESS_DIRS):
        return "harness"
    ck = spec["checkpoint_uri"].rstrip("/")
    art = spec["artifact_location"].removeprefix("file://").rstrip("/")
    if uri.startswith(ck + "/"):
        return "resume"
    if uri.startswith(art + "/"):
        inner = uri[len(art) + 1:]
        if MLFLOW_CKPT.search(inner):
            return "resume-mlflow"
        return "final" if "/models/" in f"/{inner}" or "/artifacts/model/" in f"/{inner}" else "other"
    return "resume" if RESUME_PATH.search(rel) else "other"


def classified(items: list[tuple[str, str, int]], spec: dict) -> list[tuple[str, str, int, str]]:
    """Each item with its kind; every file of an MLflow logged model that holds a checkpoint's
    copy (the HF Trainer logs ``checkpoint-N`` as a model) is part of that copy."""
    out = [(u, r, s, classify(u, r, spec)) for u, r, s in items]
    copies = {m[1] for u, _, _, k in out if k == "resume-mlflow" and (m := LOGGED_MODEL.match(u))}
    return [(u, r, s, "resume-mlflow" if k == "final" and (m := LOGGED_MODEL.match(u)) and m[1] in copies else k)
            for u, r, s, k in out]


def held(spec: dict, bucket: str | None, endpoint: str | None) -> dict:
    """The bytes a run holds at its end, split into resume state, final model, other, and
    stored twice (content held more than once, beyond the first copy, plus every checkpoint
    copied into MLflow)."""
    items = [(u, r, s) for u, r, s in local_files(spec["workdir"])]
    if bucket:
        items += s3_objects(endpoint, bucket)
    out = {"resume": 0, "resume-mlflow": 0, "final": 0, "other": 0, "twice": 0, "files": 0, "copies": []}
    seen: dict[str, str] = {}
    for uri, rel, size, kind in classified(sorted(items), spec):
        if kind == "harness":
            continue
        out[kind] += size
        out["files"] += 1
        if kind == "resume-mlflow":  # a checkpoint's copy, whatever its bytes
            out["twice"] += size
            out["copies"].append([rel, size, "a checkpoint logged to MLflow"])
            continue
        key = content_key(uri, size, endpoint) if size else f"empty:{uri}"
        if key in seen:
            out["twice"] += size
            out["copies"].append([rel, size, seen[key]])
        seen.setdefault(key, rel)
    out["total"] = out["resume"] + out["resume-mlflow"] + out["final"] + out["other"]
    return out


# --------------------------------------------------------------------------- corruption
def newest_checkpoint(files: list[str]) -> tuple[int, list[str]] | None:
    """The newest checkpoint among a run's checkpoint files: its step and its files (a
    ``step_N/`` or ``checkpoint-N/`` folder, or one Lightning ``.ckpt`` file, its step from
    ``step=N`` in the name)."""
    units: dict[str, tuple[int, list[str]]] = {}
    for f in files:
        m = CKPT_UNIT.match(f)
        if not m:
            continue
        if m.group(1):
            unit, step = m.group(1), int(m.group(2))
        else:
            unit = m.group(3)
            found = re.search(r"step=(\d+)", os.path.basename(unit))
            if not found:
                continue  # last.ckpt: a copy of a stepped one
            step = int(found.group(1))
        units.setdefault(unit, (step, []))[1].append(f)
    if not units:
        return None
    return max(units.values(), key=lambda u: u[0])


def size_of(uri: str, endpoint: str | None) -> int:
    if uri.startswith("s3://"):
        bucket, key = uri[5:].split("/", 1)
        return s3_client(endpoint).head_object(Bucket=bucket, Key=key)["ContentLength"]
    return os.path.getsize(uri)


def corrupt(files: list[str], variant: str, endpoint: str | None) -> str:
    """Corrupts the largest of ``files`` (``flip``: one byte in its middle inverted;
    ``truncate``: cut to half; ``delete``: removed); returns what was done."""
    largest = max(files, key=lambda f: size_of(f, endpoint))
    size = size_of(largest, endpoint)
    if variant == "delete":
        write_or_delete(largest, None, endpoint)
        return f"deleted {largest}"
    data = bytearray(read_range(largest, 0, size, endpoint))
    if variant == "flip":
        data[size // 2] ^= 0xFF
        write_or_delete(largest, bytes(data), endpoint)
        return f"flipped byte {size // 2} of {largest}"
    write_or_delete(largest, bytes(data[: size // 2]), endpoint)
    return f"truncated {largest} to {size // 2} of {size} bytes"


def write_or_delete(uri: str, data: bytes | None, endpoint: str | None) -> None:
    if uri.startswith("s3://"):
        bucket, key = uri[5:].split("/", 1)
        client = s3_client(endpoint)
        if data is None:
            client.delete_object(Bucket=bucket, Key=key)
        else:
            client.put_object(Bucket=bucket, Key=key, Body=data)
        return
    if data is None:
        os.remove(uri)
    else:
        with open(uri, "r+b") as f:
            f.truncate(0)
            f.write(data)


# --------------------------------------------------------------------------- the final model
def final_model(result: dict, spec: dict, work: str) -> dict:
    """Whether the run registered its final model once, whether ``mlflow.transformers.load_model``
    loads it, and whether its artifacts hold optimizer state (a file or a tensor named so)."""
    uri = result.get("registered_model_uri")
    out = {"registered": 0, "loadable": None, "optimizer_free": None, "uri": uri}
    if not uri:
        return out
    import mlflow

    mlflow.set_tracking_uri(spec["mlflow_tracking_uri"])
    mlflow.set_registry_uri(spec["mlflow_tracking_uri"])
    if uri.startswith("models:/"):
        name = uri[len("models:/"):].split("/")[0]
        out["registered"] = len(mlflow.MlflowClient().search_model_versions(f"name='{name}'"))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=os.path.join(work, "registered"))
        out["optimizer_free"] = not optimizer_state(local)
        mlflow.transformers.load_model(uri, return_type="components")
        out["loadable"] = True
    except Exception as e:  # noqa: BLE001 (reported, not raised)
        out["loadable"] = False
        out["load_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return out


def optimizer_state(folder: str) -> list[str]:
    """Files or safetensors tensors under ``folder`` named like optimizer state."""
    from safetensors import safe_open

    found = []
    for uri, rel, _ in local_files(folder):
        if OPTIMIZER.search(rel):
            found.append(rel)
        elif rel.endswith(".safetensors"):
            with safe_open(uri, "pt") as f:
                found += [f"{rel}:{k}" for k in f.keys() if OPTIMIZER.search(k)]
    return found


def final_model_apart(result: dict, spec: dict, work: str, env: dict) -> dict:
    """:func:`final_model` in a process of its own (MLflow's registry client keeps state between
    stores in one process; the loaded model's memory is given back)."""
    import json
    import subprocess

    os.makedirs(work, exist_ok=True)
    args = os.path.join(work, "final-args.json")
    with open(args, "w") as f:
        json.dump({"result": result, "spec": spec, "work": work}, f)
    proc = subprocess.run([sys.executable, __file__, args], capture_output=True, text=True, env=env, timeout=600)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"registered": 0, "loadable": None, "optimizer_free": None, "uri": result.get("registered_model_uri"),
                "load_error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


if __name__ == "__main__":
    import json

    with open(sys.argv[1]) as f:
        given = json.load(f)
    print(json.dumps(final_model(given["result"], given["spec"], given["work"])))
