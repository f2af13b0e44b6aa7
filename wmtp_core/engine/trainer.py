"""The training loop. It writes no storage: checkpoints leave through the router only."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

import attrs
import pluggy
import torch

from wmtp_core.config import Settings
from wmtp_core.engine import data as data_mod
from wmtp_core.engine.algorithms import BaselineMTP, head_ce, weighted_loss
from wmtp_core.engine.model import ModelConfig, MTPModel
from wmtp_core.engine.optim import build_optimizer, build_scheduler
from wmtp_core.engine.state import cpu_copy, restore_rng, rng_state, tensor_bytes
from wmtp_core.events import Payload, RunInfo, StepEnded
from wmtp_core.roles import Role


class TrainingError(RuntimeError):
    pass


@attrs.define
class Outcome:
    status: str = "finished"
    reason: str = ""
    last_step: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan
    metrics: dict[str, float] = attrs.Factory(dict)
    losses: list[float] = attrs.Factory(list)


def model_config(settings: Settings) -> ModelConfig:
    m = settings.recipe.model
    return ModelConfig(vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                       n_heads=m.n_heads, n_future=m.n_future, max_seq_len=m.max_seq_len,
                       dropout=m.dropout)


def load_documents(settings: Settings, sources: list[str]) -> list[bytes]:
    docs: list[bytes] = []
    datasets = settings.config.paths.datasets
    for name in sources:
        if name in datasets:
            url = datasets[name]
            docs += data_mod.stdlib_documents() if url == data_mod.STDLIB else data_mod.url_documents(url)
        elif name == data_mod.STDLIB:
            docs += data_mod.stdlib_documents()
        else:
            raise TrainingError(
                f"data source {name!r} is neither built in ({data_mod.STDLIB!r}) nor a key of "
                f"paths.datasets (defined: {', '.join(sorted(datasets)) or 'none'})"
            )
    return docs


class Trainer:
    """One run: model, optimiser, data and the algorithm, stepping and emitting checkpoints."""

    def __init__(self, settings: Settings, run: RunInfo, pm: pluggy.PluginManager,
                 router: Any, *, on_step: Callable[[int, Mapping[str, float]], None] | None = None):
        self.settings = settings
        self.run = run
        self.pm = pm
        self.router = router
        self.on_step = on_step or (lambda step, metrics: None)
        self.step = 0
        self.last_saved = -1
        self.best: float | None = None
        self.bad_evals = 0
        self._setup()

    # -- setup -----------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, recipe = self.settings.config, self.settings.recipe
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cpu")
        self.model_cfg = model_config(self.settings)
        self.model = MTPModel(self.model_cfg).to(self.device)
        split = recipe.data.train
        if split.max_length > self.model_cfg.max_seq_len:
            raise TrainingError(
                f"data.train.max_length {split.max_length} exceeds model.max_seq_len "
                f"{self.model_cfg.max_seq_len}; lower one or raise the other"
            )
        windows = data_mod.windows(load_documents(self.settings, split.sources), split.max_length,
                                   split.pack_sequences)
        if recipe.data.eval is None:
            n_eval = max(1, len(windows) // 20)
            train_w, eval_w = windows[:-n_eval], windows[-n_eval:]
        else:
            ev = recipe.data.eval
            train_w = windows
            eval_w = data_mod.windows(load_documents(self.settings, ev.sources), ev.max_length,
                                      ev.pack_sequences)
        self.stream = data_mod.BatchStream(train_w, split.batch_size, seed=cfg.seed)
        self.eval_set = data_mod.eval_batches(eval_w, split.batch_size)
        per_epoch = self.stream.batches_per_epoch * recipe.train.num_epochs
        self.total_steps = min(recipe.train.max_steps or per_epoch, per_epoch)
        self.optimizer = build_optimizer(self.model.parameters(), recipe.optim)
        self.scheduler = build_scheduler(self.optimizer, recipe.optim, self.total_steps)
        self.algo = BaselineMTP(scale=recipe.loss.lambda_)

    # -- resume state ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "data": self.stream.state_dict(),
                "early_stopping": {"best": self.best, "bad_evals": self.bad_evals},
                "algo": self.algo.state_dict(),
            },
        }

    def restore(self, parts: Mapping[str, Any]) -> None:
        self.model.load_state_dict(parts["model"])
        self.optimizer.load_state_dict(parts["optimizer"])
        t = parts["trainer"]
        self.step = self.last_saved = int(t["step"])
        self.scheduler.load_state_dict(t["scheduler"])
        self.stream.load_state_dict(t["data"])
        self.best, self.bad_evals = t["early_stopping"]["best"], int(t["early_stopping"]["bad_evals"])
        self.algo.load_state_dict(t["algo"])
        restore_rng(t["rng"])

    # -- loop ------------------------------------------------------------------------------
    def train(self) -> Outcome:
        recipe, cfg = self.settings.recipe, self.settings.config
        ckpt = cfg.paths.checkpoints
        out = Outcome(last_step=self.step)
        self.model.train()
        while self.step < self.total_steps:
            batch = self.stream.next().to(self.device)
            loss, metrics = self.algo.loss(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.optim.grad_clip > 0:
                metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe.optim.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                out.status, out.reason = "failed", f"loss became {value} at step {self.step}"
                break
            metrics.update(loss=value, lr=self.scheduler.get_last_lr()[0])
            out.losses.append(value)
            if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                metrics["eval_loss"] = self.evaluate()
            self.pm.hook.wmtp_step_ended(event=StepEnded(run=self.run, step=self.step, metrics=metrics))
            self.on_step(self.step, metrics)
            out.metrics = metrics
            if ckpt.save_interval and self.step % ckpt.save_interval == 0:
                self.save_resume(metrics)
            if "eval_loss" in metrics and self._should_stop(metrics):
                out.status = "stopped_early"
                out.reason = (f"early stopping: {recipe.train.early_stopping.monitor} did not improve "
                              f"for {self.bad_evals} evaluations")
                break
        out.last_step = self.step
        if out.losses:
            out.first_loss, out.last_loss = out.losses[0], out.losses[-1]
        return out

    def evaluate(self) -> float:
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            losses = []
            for batch in self.eval_set:
                ce, mask = head_ce(self.model(batch.to(self.device)), batch)
                losses.append(float(weighted_loss(ce, mask, torch.ones_like(ce))))
        self.model.train(was)
        return sum(losses) / max(1, len(losses))

    def _should_stop(self, metrics: Mapping[str, float]) -> bool:
        es = self.settings.recipe.train.early_stopping
        if not es.enabled or es.monitor not in metrics:
            return False
        value = metrics[es.monitor]
        better = (self.best is None or
                  (value < self.best - es.min_delta if es.mode == "min" else value > self.best + es.min_delta))
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= es.patience

    # -- emitting --------------------------------------------------------------------------
    def save_resume(self, metrics: Mapping[str, float] | None = None):
        if self.router is None or not self.router.bound(Role.RESUME) or self.last_saved == self.step:
            return None
        parts = self.state()
        receipt = self.router.emit(Role.RESUME, step=self.step, payload=Payload(parts=parts),
                                   metrics=_scalars(metrics), nbytes=tensor_bytes(parts))
        self.last_saved = self.step
        return receipt

    def final_payload(self) -> Payload:
        weights = cpu_copy(self.model.state_dict())
        module = MTPModel(self.model_cfg)
        module.load_state_dict(weights)
        module.eval()
        example = self.eval_set[0][:1].cpu() if self.eval_set else torch.zeros(1, 8, dtype=torch.long)
        return Payload(parts={"model": weights}, model=module, example_input=example,
                       model_config=attrs.asdict(self.model_cfg))

    def save_final(self, metrics: Mapping[str, float]):
        payload = self.final_payload()
        return self.router.emit(Role.FINAL, step=self.step, payload=payload,
                                metrics=_scalars(metrics), nbytes=tensor_bytes(payload.parts))


def _scalars(metrics: Mapping[str, float] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items()}
