"""The Hugging Face Trainer side of the peers benchmark (issue 21): ``python benchmarks/peers_hf.py SPEC.json``.

Trains :mod:`peers_workload`'s model (WMTP's own MTP module, a plain ``nn.Module``, and its
``baseline-mtp`` loss in ``Trainer.compute_loss``) with transformers' ``Trainer`` and stores it
the way the Trainer does. What each setup is, and why, from transformers' source
(``transformers/trainer.py``, ``trainer_utils.py``, ``training_args.py``,
``integrations/integration_utils.py``):

- **documented:** ``save_strategy="steps"``, ``save_total_limit=5``,
  ``load_best_model_at_end=True`` with ``eval_strategy="steps"`` on 32 MBPP validation
  documents and ``metric_for_best_model="loss"``, ``report_to=["mlflow"]`` with
  ``HF_MLFLOW_LOG_ARTIFACTS=1``: the documented way to keep the newest five plus the best, and
  to have MLflow hold the checkpoints. ``_save_checkpoint`` writes straight into
  ``checkpoint-N`` (weights, optimizer, scheduler, RNG states, trainer state), then
  ``rotate_checkpoints`` removes the oldest, sparing the newest and the best;
  ``MLflowCallback.on_save`` then logs the whole ``checkpoint-N`` folder, optimizer included,
  as a pyfunc model. The final (best) model is loaded, not registered.
- **best_effort:** the same checkpoints with ``report_to=["mlflow"]`` for metrics only
  (``HF_MLFLOW_LOG_ARTIFACTS`` unset), no evaluation (keep-best: the same
  ``load_best_model_at_end`` mechanism), and after ``train`` the few lines a user writes to
  register the final model with ``mlflow.transformers.log_model``
  (:func:`peers_workload.register`: the folder WMTP registers, head 0 as a Hugging Face causal
  LM with the extra heads beside it).
- **optimiser:** ``optim="adamw_torch"`` (``torch.optim.AdamW``) with torch's default
  ``weight_decay=0.01``, which the Trainer applies to every weight but biases and LayerNorms
  (``get_decay_parameter_names``); ``max_grad_norm=0`` turns clipping off (``if
  args.max_grad_norm > 0``).
- **keep_best:** ``load_best_model_at_end`` (``save_total_limit`` keeps the best as well).
- **resume:** ``trainer.train(resume_from_checkpoint=get_last_checkpoint(output_dir))``, the
  pattern of transformers' own example scripts (``run_clm.py``): ``resume_from_checkpoint=True``
  raises "No valid checkpoint found" on an empty ``output_dir``, so the examples look first and
  start fresh when there is none. ``get_last_checkpoint`` takes the highest ``checkpoint-N``
  folder and checks nothing.
- **store s3:** ``output_dir`` must be a local directory (the Trainer writes with ``os``), so
  the checkpoints stay under ``workdir``; only the MLflow artifacts go to S3.

A few lines of user code are unavoidable with this module: ``safetensors`` refuses tensors that
share memory, and GPT-2 ties its LM head to its input embedding, so the plain-``nn.Module``
branch of ``Trainer._save`` fails ("Some tensors share memory"). ``MTPTrainer._save`` leaves
the tied duplicate out, and :func:`for_trainer` names it in ``_keys_to_ignore_on_save`` and
gives the module a ``tie_weights``, so that loading a checkpoint (``load_state_dict(strict=False)``,
then ``_issue_warnings_after_load``) re-ties it instead of failing on the plain module.

Saves are timed from the start of ``Trainer._save_checkpoint`` to the end of the callbacks'
``on_save`` (the MLflow copy): the whole time the training loop waits; a SIGKILL during the k-th
comes from :class:`peers_workload.KillDuringSave`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers_workload as W  # noqa: E402


def output_dir(spec: dict) -> str:
    """The Trainer's ``output_dir``: the checkpoint location, or on S3 (which the Trainer cannot
    write) a local folder under the run's ``workdir``."""
    uri = spec["checkpoint_uri"]
    if "://" in uri and not uri.startswith("file://"):
        return os.path.join(spec["workdir"], "checkpoints")
    return uri.removeprefix("file://")


# --- user code: the Trainer saves a plain nn.Module with safetensors, which refuses GPT-2's tied LM head ---
TIED = ["base.lm_head.weight"]


def for_trainer(model):
    """The module as the Trainer needs it: the tied head named as left out of its saves (the
    Trainer then re-ties instead of warning) and a ``tie_weights`` to call."""
    model._keys_to_ignore_on_save = TIED
    model.tie_weights = model.base.tie_weights
    return model
# --- end of user code ---


def trainer_class():
    from transformers import Trainer

    class MTPTrainer(Trainer):
        """The Trainer with WMTP's loss, its saves timed (and maybe killed) by ``saves``."""

        def __init__(self, *args, saves: W.KillDuringSave, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.saves = saves
            on_save = self.callback_handler.on_save

            def on_save_then_end(*a, **kw):
                try:
                    return on_save(*a, **kw)
                finally:
                    self.saves.end()

            self.callback_handler.on_save = on_save_then_end

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = W.mtp_loss(model, inputs["ids"], inputs["lengths"])
            return (loss, {"loss": loss}) if return_outputs else loss

        def _save_checkpoint(self, model, trial):
            self.saves.begin()
            return super()._save_checkpoint(model, trial)

        # --- user code: save GPT-2's tied LM head once ---
        def _save(self, output_dir=None, state_dict=None):
            state_dict = state_dict if state_dict is not None else self.model.state_dict()
            return super()._save(output_dir, {k: v for k, v in state_dict.items() if k not in TIED})
        # --- end of user code ---

    return MTPTrainer


def arguments(spec: dict, out: str):
    from transformers import TrainingArguments

    documented = spec["setup"] == "documented"
    best = documented or spec["keep_best"]
    evaluation = dict(eval_strategy="steps", eval_steps=spec["save_every"], load_best_model_at_end=True,
                      metric_for_best_model="loss", greater_is_better=False,
                      per_device_eval_batch_size=W.BATCH) if best else {}
    return TrainingArguments(
        output_dir=out, max_steps=spec["steps"], per_device_train_batch_size=W.BATCH, learning_rate=W.LR,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, optim="adamw_torch", weight_decay=0.01,
        save_strategy="steps", save_steps=spec["save_every"], save_total_limit=spec["keep_last"],
        seed=spec["seed"], data_seed=spec["seed"], full_determinism=True, use_cpu=True, report_to=["mlflow"],
        logging_steps=1, dataloader_num_workers=0, dataloader_drop_last=True, remove_unused_columns=False,
        label_names=["ids"], prediction_loss_only=True, disable_tqdm=True, **evaluation)


def mlflow_env(spec: dict) -> None:
    """The MLflow callback's settings, from the environment as transformers documents them."""
    W.ensure_experiment(spec)
    os.environ["MLFLOW_TRACKING_URI"] = spec["mlflow_tracking_uri"]
    os.environ["MLFLOW_EXPERIMENT_NAME"] = W.experiment_name(spec)
    if spec["setup"] == "documented":
        os.environ["HF_MLFLOW_LOG_ARTIFACTS"] = "1"
    else:
        os.environ.pop("HF_MLFLOW_LOG_ARTIFACTS", None)


def start_step_callback(seen: dict):
    from transformers import TrainerCallback

    class StartStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["step"] = state.global_step

    return StartStep()


def train(spec: dict, folder: str, fields: dict) -> None:
    """Train, then fill ``fields`` (the result) as each part is done."""
    from transformers.trainer_utils import get_last_checkpoint

    notes = fields["notes"]
    out = output_dir(spec)
    if out != spec["checkpoint_uri"].removeprefix("file://"):
        notes.append("the HF Trainer writes checkpoints to a local output_dir only: they stay under workdir; "
                     "only MLflow artifacts go to S3")
    mlflow_env(spec)
    tokenizer = W.load_tokenizer(folder)
    model = for_trainer(W.build_mtp_model(folder))
    args = arguments(spec, out)
    best = args.load_best_model_at_end
    evaluation = W.dataset(tokenizer, W.mbpp_rows("validation")[: W.EVAL_ROWS]) if best else None
    saves = W.KillDuringSave(spec.get("kill_during_save"), spec.get("kill_seed") or 0)
    seen: dict = {}
    trainer = trainer_class()(model=model, args=args, train_dataset=W.dataset(tokenizer, W.mbpp_rows("train")),
                              eval_dataset=evaluation, data_collator=W.collate, processing_class=tokenizer,
                              callbacks=[start_step_callback(seen)], saves=saves)
    last = get_last_checkpoint(out) if spec["resume"] and os.path.isdir(out) else None
    if spec["resume"] and last is None:
        notes.append("resume: no checkpoint-N in output_dir; trained from scratch (the example scripts' pattern)")
    trainer.train(resume_from_checkpoint=last)
    if spec["resume"]:
        notes.append("resume: the MLflow callback (no MLFLOW_RUN_ID) starts a new MLflow run")
    if best:
        notes.append(f"final weights: the best checkpoint loaded at the end ({trainer.state.best_model_checkpoint})")
    fields.update(stalls=saves.durations, resumed_from_step=seen.get("step") if last else None,
                  final_step=trainer.state.global_step,
                  final_weights=W.save_weights(trainer.model, os.path.join(spec["workdir"], "final.safetensors")))
    if spec["setup"] == "best_effort":
        fields["registered_model_uri"] = W.register(spec, model, tokenizer, mlflow_run_id(), notes)
    else:
        notes.append("the HF Trainer registers no model")


def mlflow_run_id() -> str:
    """The MLflow run the Trainer's MLflow callback logged to (it has ended it)."""
    import mlflow

    return mlflow.last_active_run().info.run_id


def checkpoint_files(spec: dict) -> list[str]:
    """Every file under ``output_dir`` (the ``checkpoint-N`` folders)."""
    found = []
    for root, _, files in os.walk(output_dir(spec)):
        found += [os.path.join(root, f) for f in files]
    return sorted(found)


if __name__ == "__main__":
    sys.exit(W.run_peer(sys.argv, train, checkpoint_files))
