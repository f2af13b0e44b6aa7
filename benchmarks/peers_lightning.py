"""The Lightning side of the peers benchmark (issue 21): ``python benchmarks/peers_lightning.py SPEC.json``.

Trains :mod:`peers_workload`'s model (WMTP's own MTP module and ``baseline-mtp`` loss in a
``LightningModule``) with Lightning 2.6's ``Trainer`` and stores it the way Lightning does. What
each setup is, and why, from Lightning's source (``lightning/pytorch/callbacks/model_checkpoint.py``,
``loggers/mlflow.py``, ``loggers/utilities.py``, ``trainer/connectors/checkpoint_connector.py``,
``fabric/utilities/cloud_io.py``):

- **documented:** ``ModelCheckpoint(dirpath, every_n_train_steps, save_top_k=5, monitor="step",
  mode="max", save_last=True)`` and ``MLFlowLogger(log_model="all")``: the documented way to keep
  the newest five and to have MLflow hold every checkpoint. ``save_last=True`` is what
  ``fit(ckpt_path="last")`` needs: "last" only looks for ``last*.ckpt`` in ``dirpath``
  (``_find_last_checkpoints``) and picks the newest by modification time; without such a file
  it warns and trains from scratch. ``log_model="all"`` copies each new ``.ckpt``, ``last.ckpt``
  included, into the run's artifacts right after the save (``_scan_and_log_checkpoints``), and
  only local files (``Path(p).is_file()``): a remote ``dirpath`` is never logged.
- **best_effort:** the same callback with ``save_last="link"`` (a symlink to the newest top-k
  file instead of a second full copy; local ``dirpath`` and keep-newest only: on a remote
  ``dirpath`` Lightning cannot link, and with keep-best the link would name the last *kept*
  file, not the newest step), ``MLFlowLogger(log_model=False)`` (metrics only), and after
  ``fit`` the few lines a user writes to register the final model with
  ``mlflow.transformers.log_model`` (:func:`peers_workload.register`: the folder WMTP
  registers, head 0 as a Hugging Face causal LM with the extra heads beside it). Lightning has
  no model registry of its own.
- **keep_best:** ``monitor="train_loss", mode="min"`` (logged every step) instead of the step.
- **resume:** ``trainer.fit(module, ckpt_path="last")``, Lightning's own mechanism. Lightning
  saves no RNG state and a plain ``DataLoader`` is "not resumable" (it warns), and with an
  ``s3://`` ``dirpath`` "last" finds nothing (the listed paths lose their protocol and are
  looked for on the local disk) and training starts over.
- **store s3:** ``dirpath`` is the ``s3://`` URI (Lightning writes it through fsspec/s3fs);
  the MLflow artifacts go to the experiment's artifact location.

Saves are timed around ``ModelCheckpoint.on_train_batch_end`` on the steps where one is due
(the top-k save, ``last``, the logger's copy and the removal of the oldest: the whole time the
training loop waits); a SIGKILL during the k-th such save comes from
:class:`peers_workload.KillDuringSave`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers_workload as W  # noqa: E402


def module_class():
    import lightning as L
    import torch

    class MTPModule(L.LightningModule):
        """WMTP's MTP module and ``baseline-mtp`` loss; AdamW at the workload's LR, nothing else."""

        def __init__(self, folder: str) -> None:
            super().__init__()
            self.model = W.build_mtp_model(folder)

        def training_step(self, batch, batch_idx):
            loss = W.mtp_loss(self.model, batch["ids"], batch["lengths"])
            self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=len(batch["ids"]))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=W.LR)

    return MTPModule


def checkpoint_callback(spec: dict, notes: list[str]):
    from lightning.pytorch.callbacks import ModelCheckpoint

    local = not spec["checkpoint_uri"].startswith("s3://")
    save_last = "link" if spec["setup"] == "best_effort" and local and not spec["keep_best"] else True
    if spec["setup"] == "best_effort" and save_last is True:
        notes.append("save_last='link' is not usable here (remote dirpath or keep-best): last.ckpt is a full copy")
    monitor = ("train_loss", "min") if spec["keep_best"] else ("step", "max")
    return ModelCheckpoint(dirpath=spec["checkpoint_uri"], every_n_train_steps=spec["save_every"],
                           save_top_k=spec["keep_last"], monitor=monitor[0], mode=monitor[1], save_last=save_last)


def mlflow_logger(spec: dict, notes: list[str]):
    from lightning.pytorch.loggers import MLFlowLogger

    documented = spec["setup"] == "documented"
    if documented and spec["checkpoint_uri"].startswith("s3://"):
        notes.append("checkpoints on s3 are not logged to MLflow by Lightning (log_model='all' logs local files only)")
    return MLFlowLogger(experiment_name=W.experiment_name(spec), tracking_uri=spec["mlflow_tracking_uri"],
                        log_model="all" if documented else False, artifact_location=spec["artifact_location"])


def watch_saves(callback, every: int, saves: W.KillDuringSave) -> None:
    """Time (and maybe kill) the callback's work on the steps where a save is due."""
    inner = callback.on_train_batch_end

    def on_train_batch_end(trainer, pl_module, *args, **kwargs):
        if trainer.global_step % every:
            return inner(trainer, pl_module, *args, **kwargs)
        saves.begin()
        try:
            return inner(trainer, pl_module, *args, **kwargs)
        finally:
            saves.end()

    callback.on_train_batch_end = on_train_batch_end


def start_step_callback(seen: dict):
    from lightning.pytorch.callbacks import Callback

    class StartStep(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step if trainer.ckpt_path else None
            seen["ckpt_path"] = trainer.ckpt_path

    return StartStep()


def train(spec: dict, folder: str, fields: dict) -> None:
    """Train, then fill ``fields`` (the result) as each part is done."""
    import lightning as L

    notes = fields["notes"]
    L.seed_everything(spec["seed"], workers=True)
    W.ensure_experiment(spec)
    tokenizer = W.load_tokenizer(folder)
    loader = W.batches(tokenizer, W.mbpp_rows("train"), W.BATCH, W.MAX_LENGTH, spec["seed"])
    module = module_class()(folder)
    checkpoint, logger = checkpoint_callback(spec, notes), mlflow_logger(spec, notes)
    saves = W.KillDuringSave(spec.get("kill_during_save"), spec.get("kill_seed") or 0)
    watch_saves(checkpoint, spec["save_every"], saves)
    seen: dict = {}
    trainer = L.Trainer(max_steps=spec["steps"], accelerator="cpu", devices=1, logger=logger,
                        callbacks=[checkpoint, start_step_callback(seen)], enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, log_every_n_steps=1,
                        default_root_dir=spec["workdir"])
    trainer.fit(module, train_dataloaders=loader, ckpt_path="last" if spec["resume"] else None)
    if spec["resume"] and seen.get("step") is None:
        why = (" (on s3: _find_last_checkpoints drops the s3:// of what it lists, then looks for the files on "
               "the local disk; Lightning-AI/pytorch-lightning#18261)" if spec["checkpoint_uri"].startswith("s3://") else "")
        notes.append("resume: Lightning found no last checkpoint and trained from scratch" + why)
    if spec["resume"]:
        notes.append("resume: MLFlowLogger (no run_id) starts a new MLflow run; with log_model='all' it copies "
                     "every kept checkpoint into that run again")
    fields.update(stalls=saves.durations, resumed_from_step=seen.get("step"), final_step=trainer.global_step,
                  final_weights=W.save_weights(module.model, os.path.join(spec["workdir"], "final.safetensors")))
    if spec["setup"] == "best_effort":
        fields["registered_model_uri"] = W.register(spec, module.model, tokenizer, logger.run_id, notes)
    else:
        notes.append("Lightning registers no model")


def checkpoint_files(spec: dict) -> list[str]:
    """Every file under the checkpoint location (``s3://`` URIs for S3)."""
    import fsspec

    uri = spec["checkpoint_uri"]
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            return []
        found = sorted(fs.find(path))
    except Exception:  # noqa: BLE001 - a listing that fails is an empty one here
        return []
    return [f"s3://{p}" for p in found] if uri.startswith("s3://") else found


if __name__ == "__main__":
    sys.exit(W.run_peer(sys.argv, train, checkpoint_files))
