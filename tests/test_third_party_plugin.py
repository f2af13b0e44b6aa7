"""A third-party sink package (examples/wmtp-tarball-sink), installed for real with uv and found
through its entry point only: nothing in WMTP names it."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import blake3
import pytest
import torch
from builders import recipe, write
from conftest import ROOT, run_cli, tree

pytestmark = pytest.mark.slow

PACKAGE = ROOT / "examples" / "wmtp-tarball-sink"

RECIPE = recipe(4, run={"name": "tar-run"}, train={"algo": "baseline-mtp"},
                optim={"lr": 0.003, "scheduler": "constant", "warmup_ratio": 0.0})


def config(base: Path, storage: dict) -> dict:
    return {
        "seed": 7,
        "log_interval": 2,
        "paths": {"checkpoints": {"base_path": f"file://{base}", "save_interval": 2, "keep_last": 2,
                                  "save_final": True}},
        "mlflow": None,
        "storage": storage,
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example package, built and installed into a folder of its own."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is required to install the example plugin package (CI installs it; "
                    "locally: python3 -m pip install uv)")
    target = tmp_path_factory.mktemp("plugin") / "site"
    proc = subprocess.run(
        [uv, "pip", "install", "--no-deps", "--python", sys.executable, "--target", str(target),
         str(PACKAGE)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"uv pip install failed:\n{proc.stderr[-3000:]}"
    return target


@pytest.fixture(scope="module")
def env(site) -> dict[str, str]:
    """The environment of a process that sees the installed package (and writes no bytecode
    into the repository)."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def tarball_run(tmp_path_factory, env):
    """A real tiny training run whose final model goes to the tarball sink."""
    cwd = tmp_path_factory.mktemp("tarball-run")
    base = cwd / "ckpt"
    write(cwd / "config.yaml", config(base, {"final": {"sink": "tarball"}}))
    write(cwd / "recipe.yaml", RECIPE)
    proc = run_cli(["--config", "config.yaml", "--recipe", "recipe.yaml"], cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "tar-run", proc


def test_entry_point_registers_the_tarball_sink(env):
    code = """
import json
from wmtp_core.plugins import build_catalog, distributions, make_plugin_manager
pm = make_plugin_manager()
spec = build_catalog(pm).sinks["tarball"]
print(json.dumps({"roles": sorted(r.value for r in spec.roles), "protocols": list(spec.protocols),
                  "description": spec.description, "dist": distributions(pm).get("tarball")}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert found["roles"] == ["final"]
    assert found["protocols"] == []
    assert found["description"]
    assert found["dist"] == "wmtp-tarball-sink==0.1.0"


def test_final_model_is_exported_as_one_committed_tar(tarball_run):
    run_dir, proc = tarball_run
    export = run_dir / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert (manifest["role"], manifest["step"], manifest["run"]) == ("final", 4, "tar-run")
    (entry,) = manifest["files"]
    data = (export / "model.tar").read_bytes()
    assert manifest["hash"] == "blake3"
    assert entry == {"path": "model.tar", "size": len(data), "digest": blake3.blake3(data).hexdigest()}

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert sorted(tar.getnames()) == ["model.pt", "model_config.json"]
        weights = torch.load(io.BytesIO(tar.extractfile("model.pt").read()), weights_only=True)
        architecture = json.loads(tar.extractfile("model_config.json").read())
    assert {k: architecture[k] for k in ("d_model", "n_layers", "n_heads", "n_future")} == {
        "d_model": 32, "n_layers": 1, "n_heads": 2, "n_future": 2}

    last = max((p for p in run_dir.glob("step_*") if (p / "manifest.json").exists()),
               key=lambda p: int(p.name.removeprefix("step_")))
    assert last.name == "step_4"
    resumed = torch.load(last / "model.pt", weights_only=True)
    assert weights.keys() == resumed.keys()
    for k, v in resumed.items():
        assert torch.equal(weights[k], v), k


def test_final_model_goes_to_the_tarball_sink_only(tarball_run):
    run_dir, proc = tarball_run
    assert re.search(r"final\s+-> tarball: \S*tar-run/export", proc.stdout), proc.stdout
    assert not (run_dir / "final").exists(), "the local sink received the final model too"
    assert sorted(p.name for p in run_dir.iterdir()) == ["export", "step_2", "step_4"]


def test_tarball_cannot_be_bound_to_resume(tmp_path, env):
    write(tmp_path / "config.yaml", config(tmp_path / "ckpt", {"resume": {"sink": "tarball"}}))
    write(tmp_path / "recipe.yaml", RECIPE)
    before = tree(tmp_path)
    proc = run_cli(["--config", "config.yaml", "--recipe", "recipe.yaml"], cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = " ".join(proc.stderr.split())
    assert "sink 'tarball' does not serve role 'resume' (it declares final)" in message, message
    assert re.search(r"sinks that serve 'resume': [\w., ]*\blocal\b", message), message
    assert tree(tmp_path) == before, "a refused binding wrote something"


def test_package_passes_its_own_sink_contract_tests(tmp_path, env):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(PACKAGE / "tests"), "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b6 passed, 12 skipped\b", proc.stdout), proc.stdout[-3000:]
