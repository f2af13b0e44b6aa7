"""``wmtp report --plot``: the bytes a run held over its steps, beside a trainer that also copies
every save to the tracking store, priced a month; and the same picture as the one PNG artifact
of the MLflow run. Real runs (in process), real files, a real MLflow store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zygote
from builders import files, tiny_config

from wmtp_core import Role, hookimpl
from wmtp_core.cli import main as wmtp
from wmtp_core.commit import CheckpointStore
from wmtp_core.report import GB, history_from_receipts, reconstruct
from wmtp_core.run import main as train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PICTURE = "wmtp-storage.png"
CHECKPOINT_FILES = {"model.pt", "optimizer.pt", "trainer.pt", "manifest.json", ".wmtp-staging"}


def cli(capsys, *args):
    code = wmtp([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def trained(tmp: Path, capsys, *, steps: int, keep_last: int, mlflow: bool = False, plugins=(),
            resume: bool = False) -> str:
    """A tiny run ``r`` saving every 2 steps; returns its config file. Without ``mlflow`` the final
    model goes to the file sink, beside the resume checkpoints."""
    config = tiny_config(tmp, paths={"checkpoints": {"save_interval": 2, "keep_last": keep_last}},
                         **({} if mlflow else {"mlflow": None}))
    args = files(tmp, config, {"run": {"name": "r"}, "train": {"max_steps": steps}}, name=f"{steps}")
    code = train(args + (["--resume", "latest"] if resume else []), plugins=plugins)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return args[1]


def manifest_bytes(run_dir: Path) -> dict[str, int]:
    """Directory name -> the bytes its manifest records."""
    return {p.parent.name: sum(f["size"] for f in json.loads(p.read_text())["files"])
            for p in run_dir.glob("*/manifest.json")}


def usd_in(line: str) -> float:
    return float(re.search(r"([\d,.]+) USD a month", line).group(1).replace(",", ""))


class Receipts:
    """Every commit and deletion of a run, in the order the router reports them."""

    def __init__(self) -> None:
        self.committed, self.deleted, self.newest = [], [], {}

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        self.committed.append(receipt)
        self.newest[receipt.role] = receipt.step

    @hookimpl
    def wmtp_checkpoint_deleted(self, receipt):
        self.deleted.append((receipt, self.newest[receipt.role]))


# ----------------------------------------------------------------------------- the picture and the price
def test_plot_writes_a_png_and_prices_both_ways_from_the_manifests(tmp_path, capsys):
    config = trained(tmp_path, capsys, steps=6, keep_last=10)  # nothing deleted: every save is on disk
    png, price = tmp_path / "report.png", 0.05
    code, out, err = cli(capsys, "report", "r", "--config", config, "--plot", png, "--price-per-gb-month", price)
    assert code == 0, err
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and 5_000 < len(data) < 100_000, len(data)

    sizes = manifest_bytes(tmp_path / "ck" / "r")
    assert set(sizes) == {"step_2", "step_4", "step_6", "final"}
    held = sum(sizes.values())
    dual = held + sum(n for name, n in sizes.items() if name.startswith("step_"))
    (mine,) = [line for line in out.splitlines() if "this run (resume + final)" in line]
    (theirs,) = [line for line in out.splitlines() if "copies every save to the tracking store" in line]
    assert usd_in(mine) == pytest.approx(held / GB * price, rel=1e-3)
    assert usd_in(theirs) == pytest.approx(dual / GB * price, rel=1e-3)
    assert "at 0.05 USD per GB-month" in out

    code, out, _ = cli(capsys, "report", "r", "--config", config, "--price-per-gb-month", price, "--json")
    storage = json.loads(out)["storage"]
    assert storage["held_bytes"] == held and storage["dual_writer_bytes"] == dual
    assert storage["held_usd_per_month"] == held / GB * price
    assert storage["dual_writer_usd_per_month"] == dual / GB * price
    assert storage["inferred"] == 0 and storage["last_step"] == 6


def test_the_default_price_is_s3_standard_and_a_bad_price_is_refused(tmp_path, capsys):
    config = trained(tmp_path, capsys, steps=2, keep_last=2)
    code, out, _ = cli(capsys, "report", "r", "--config", config, "--plot", tmp_path / "p.png")
    assert code == 0 and "at 0.023 USD per GB-month" in out
    code, _, err = cli(capsys, "report", "r", "--config", config, "--price-per-gb-month", "-1")
    assert code == 2 and "--price-per-gb-month: -1 is not accepted" in err


def test_deleted_saves_are_replayed_through_the_retention_policy_as_the_receipts_say(tmp_path, capsys):
    """What the run directory holds after the fact, plus the save schedule and keep_last of the
    config, gives the same saves and deletions the router reported, sizes within 1%."""
    from wmtp_plugins.retention import make_keep_last

    receipts = Receipts()
    config = trained(tmp_path, capsys, steps=9, keep_last=2, plugins=(receipts,))
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    kept = [m for _, m in store.list("r")]
    assert [m.step for m in kept] == [8, 9]
    final = store.read_manifest(store.path_of("r", "final"))
    got = reconstruct("r", kept, [(final.step, final.nbytes)], 2, make_keep_last({"keep_last": 2}))
    truth = history_from_receipts("r", receipts.committed, receipts.deleted)

    def resume(h):
        return [s for s in h.saves if s.role is Role.RESUME]

    assert [s.step for s in resume(got)] == [s.step for s in resume(truth)] == [2, 4, 6, 8, 9]
    for g, t in zip(resume(got), resume(truth)):
        assert g.inferred == (t.deleted_at is not None)
        assert g.nbytes == pytest.approx(t.nbytes, rel=0.01)
        # the router prunes in the background: it may report a deletion after a later commit
        assert (g.deleted_at is None) == (t.deleted_at is None)
        assert g.deleted_at is None or g.deleted_at <= t.deleted_at
    assert got.held(9) == truth.held(9) == sum(manifest_bytes(tmp_path / "ck" / "r").values())
    assert got.dual_writer(9) == pytest.approx(truth.dual_writer(9), rel=0.01)

    code, out, _ = cli(capsys, "report", "r", "--config", config, "--plot", tmp_path / "p.png")
    assert code == 0 and "3 deleted saves inferred from save_interval 2" in out


def test_a_config_that_does_not_describe_the_run_draws_only_what_it_holds(tmp_path, capsys):
    trained(tmp_path, capsys, steps=9, keep_last=2)
    other = tmp_path / "other.yaml"
    other.write_text(f"mlflow: null\npaths: {{checkpoints: {{base_path: 'file://{tmp_path}/ck', "
                     "save_interval: 3, keep_last: 2}}\n")
    code, out, _ = cli(capsys, "report", "r", "--config", other, "--price-per-gb-month", "0.023", "--json")
    storage = json.loads(out)["storage"]
    assert code == 0 and storage["inferred"] == 0
    assert "the config does not describe this run" in storage["note"]
    assert storage["held_bytes"] == sum(manifest_bytes(tmp_path / "ck" / "r").values())


def test_a_png_in_the_run_directory_is_no_checkpoint_for_ls_gc_verify_or_retention(tmp_path, capsys):
    config = trained(tmp_path, capsys, steps=4, keep_last=2)
    run_dir = tmp_path / "ck" / "r"
    png = run_dir / "report.png"
    assert cli(capsys, "report", run_dir, "--config", config, "--plot", png)[0] == 0
    picture = png.read_bytes()

    code, out, _ = cli(capsys, "checkpoints", "ls", run_dir, "--json")
    assert code == 0 and [e["name"] for e in json.loads(out)] == ["step_2", "step_4", "final"]
    code, out, _ = cli(capsys, "gc", tmp_path / "ck", "--min-age", "0")
    assert code == 0 and "removed 0 staging directories" in out
    code, out, _ = cli(capsys, "checkpoints", "verify", run_dir)
    assert code == 0 and "3 of 3 checkpoints verified" in out

    # the run goes on: retention prunes its checkpoints and nothing else
    trained(tmp_path, capsys, steps=8, keep_last=2, resume=True)
    # (step_4 stays: a resumed run never deletes the checkpoint it resumed from)
    assert sorted(p.name for p in run_dir.iterdir()) == ["final", "report.png", "step_4", "step_6", "step_8"]
    assert png.read_bytes() == picture
    code, out, _ = cli(capsys, "report", "r", "--config", config, "--price-per-gb-month", "1", "--json")
    report = json.loads(out)
    assert code == 0 and report["resume"]["committed"] == 3
    # and the replay knows it: step_2 alone is inferred, deleted
    assert report["storage"]["inferred"] == 1 and "does not describe" not in report["storage"]["note"]


# ----------------------------------------------------------------------------- matplotlib is optional
BLOCK_MATPLOTLIB = """
import sys

class NoMatplotlib:
    # matplotlib is installed in this venv (mlflow depends on it), so its absence cannot be
    # produced for real: this finder makes every import of it fail as a missing package would
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoMatplotlib())
from wmtp_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_matplotlib_plot_exits_2_with_one_line_saying_how_to_install_it(tmp_path, capsys):
    config = trained(tmp_path, capsys, steps=2, keep_last=2)
    png = tmp_path / "p.png"

    def blocked(*args):  # a process forked before anything imported matplotlib (tests/zygote.py)
        return zygote.run(["-c", BLOCK_MATPLOTLIB, *map(str, args)], cwd=tmp_path, timeout=120)

    proc = blocked("report", "r", "--config", config, "--plot", png)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: --plot needs matplotlib") and "pip install 'wmtp[plot]'" in line
    assert "uv sync --extra plot" in line and not png.exists()
    # the report itself needs no matplotlib, priced or not
    proc = blocked("report", "r", "--config", config, "--price-per-gb-month", "0.023")
    assert proc.returncode == 0 and "USD a month" in proc.stdout, proc.stderr


def test_report_imports_matplotlib_only_to_draw_and_never_torch_or_mlflow(tmp_path, capsys):
    config = trained(tmp_path, capsys, steps=2, keep_last=2)

    def imported(*args):
        code = "import sys; from wmtp_core.cli import main; sys.exit(main(sys.argv[1:]))"
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        return {m for m in ("torch", "mlflow", "matplotlib") if m in names}

    assert imported("report", "r", "--config", config) == set()
    assert imported("report", "r", "--config", config, "--plot", tmp_path / "p.png") == {"matplotlib"}


# ----------------------------------------------------------------------------- the MLflow run's picture
def test_the_mlflow_run_gets_one_small_png_artifact_and_no_checkpoint(tmp_path, capsys, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts under ./mlruns
    trained(tmp_path, capsys, steps=6, keep_last=2, mlflow=True)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                 registry_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    (artifact,) = client.list_artifacts(version.run_id)
    assert artifact.path == PICTURE and not artifact.is_dir
    assert 5_000 < artifact.file_size < 100_000
    local = Path(client.download_artifacts(version.run_id, PICTURE, str(tmp_path / "dl")))
    assert local.read_bytes().startswith(PNG_MAGIC)

    # not a model: the run's one logged model is the final model, and only it is registered
    experiment = client.get_experiment_by_name("tests").experiment_id
    models = client.search_logged_models(experiment_ids=[experiment])
    assert [m.model_id for m in models] == [version.model_id or version.source.removeprefix("models:/")]
    assert [m.name for m in client.search_registered_models()] == ["wmtp_baseline-mtp"]
    # and no byte of a checkpoint went to MLflow
    stored = [p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]
    assert not {p.name for p in stored} & CHECKPOINT_FILES
    assert [p.name for p in stored if p.suffix == ".png"] == [PICTURE]


def test_without_matplotlib_a_tracked_run_logs_no_picture_and_finishes(tmp_path, capsys):
    import mlflow

    config = tiny_config(tmp_path, paths={"checkpoints": {"save_interval": 2}})
    args = files(tmp_path, config, {"run": {"name": "plain"}})
    code = BLOCK_MATPLOTLIB.replace("from wmtp_core.cli import main", "from wmtp_core.run import main")
    proc = zygote.run(["-c", code, *args], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "storage picture" not in proc.stderr  # nothing failed: there was nothing to draw with
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert client.list_artifacts(run.info.run_id) == []
