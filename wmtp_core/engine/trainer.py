"""The training loop. It writes no storage and knows no sink: it hands its state to the
callback the run session gives it, and the session emits it through the router."""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Mapping

import attrs
import torch

from wmtp_core.config import Settings
from wmtp_core.config.schema import duration_seconds
from wmtp_core.engine import data as data_mod
from wmtp_core.engine import distributed, final_shards, models
from wmtp_core.engine.algorithms import CriticWMTP, head_ce, weighted_loss
from wmtp_core.engine.final import final_payload
from wmtp_core.engine.optim import build_optimizer, build_scheduler
from wmtp_core.engine.parts import (  # noqa: F401  (also importable from here, as before)
    LoadModel,
    autocast_dtype,
    build_algorithm,
    check_algorithm,
    check_source,
    choose_device,
    load_documents,
    model_config,
    resolve_model,
)
from wmtp_core.engine.state import check_restorable, refusal, restore_rng, rng_state
from wmtp_core.errors import CheckpointError, TrainingError, WmtpError, first_line
from wmtp_core.events import Payload
from wmtp_core.tensors import cpu_copy


@attrs.define
class Outcome:
    status: str = "finished"
    """``finished``, ``stopped_early`` or ``failed`` (a :class:`wmtp_core.events.RunStatus`)."""
    reason: str = ""
    last_step: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan
    metrics: dict[str, float] = attrs.Factory(dict)
    losses: list[float] = attrs.Factory(list)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``storage.final.dtype``: what the final model's floating-point weights are stored in."""


class Trainer:
    """One run's model, optimiser, data and algorithm, stepping. It holds no run identity, no
    router and no plugin manager: what it produces leaves through the callbacks of
    :meth:`train`."""

    def __init__(self, settings: Settings, world: distributed.World, load: LoadModel) -> None:
        self.settings = settings
        self.world = world
        self.step = 0
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.clock = {"trained": 0.0, "last_save": 0.0}
        """Training time in seconds, and its value at the last save (``save_every``)."""
        self._setup(load)

    # -- setup -----------------------------------------------------------------------------
    def _setup(self, load: LoadModel) -> None:
        cfg, recipe = self.settings.config, self.settings.recipe
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.device = choose_device(cfg.devices.compute_backend)
        self.amp = autocast_dtype(cfg.devices.mixed_precision, self.device)
        check_algorithm(self.settings)
        self.base = models.build_base(self.settings, load)
        self.model = self.base.model.to(self.device)
        devices = cfg.devices
        self.fsdp = devices.fsdp.enabled
        self.algo = build_algorithm(self.settings, load, self.base).to(self.device)
        self.algo.ranks = self.world  # batch statistics are the global batch's, on every rank
        if self.fsdp:
            if devices.fsdp.activation_ckpt and self.base.is_hf:
                self.model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            elif devices.fsdp.activation_ckpt:
                self.model.activation_checkpointing = True
            if isinstance(self.algo, CriticWMTP):
                # sharded with the model (its gradients reduced across ranks), saved with its shards
                self.model.value_head = self.algo.value_head
                self.algo.value_head_in_model = True
            distributed.shard(self.model, devices.fsdp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp is torch.float16)
        self.losses: list[float] = []
        split = recipe.data.train
        windows = self._windows(split, "train", "data.train")
        if recipe.data.eval is None:
            train_w, eval_w = data_mod.split_tail(windows, data_mod.held_out(len(windows)))
        else:
            train_w, eval_w = windows, self._windows(recipe.data.eval, "eval", "data.eval")
        # the stream yields the global batch; each rank trains on its own rows of it
        self.stream = data_mod.BatchStream(train_w, split.batch_size * self.world.size, seed=cfg.seed)
        eval_bs = recipe.data.eval.batch_size if recipe.data.eval is not None else split.batch_size
        self.eval_set = data_mod.eval_batches(eval_w, eval_bs)
        self.accum = recipe.train.grad_accum_steps
        self.steps = data_mod.StepCount(rows=len(train_w), rows_per_step=self.stream.batch_size * self.accum,
                                        epochs=recipe.train.num_epochs, max_steps=recipe.train.max_steps)
        self.total_steps = self.steps.steps
        extra = self.algo.param_groups()
        own = {id(p) for g in extra for p in g["params"]}
        groups = [{"params": [p for p in self.model.parameters() if id(p) not in own]}, *extra]
        self.optimizer = build_optimizer(groups, recipe.optim)
        self.scheduler = build_scheduler(self.optimizer, recipe.optim, self.total_steps)

    def _windows(self, split: Any, name: str, key: str) -> data_mod.Windows:
        """The split's documents, tokenized with the base model's tokenizer, cut into rows."""
        limit = self.base.max_positions
        if split.max_length > limit:
            raise TrainingError(f"{key}.max_length {split.max_length} exceeds the {limit} positions the "
                                "model takes (model.max_seq_len, or the base model's config); lower it")
        docs = load_documents(self.settings, split.sources, name, f"{key}.sources")
        return data_mod.split_windows(docs, split, self.base.tokenizer)

    # -- resume state ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs: ``model``, ``optimizer`` (shards under FSDP) and
        ``trainer`` (counters, RNG streams, data position, early stopping, algorithm state)."""
        weights = distributed.sharded_state(self.model, self.optimizer) if self.fsdp else {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        return {
            **weights,
            "trainer": {
                "step": self.step,
                "model_config": self.base.record,
                "losses": list(self.losses),
                "scaler": self.scaler.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "data": self.stream.state_dict(),
                "early_stopping": {"best": self.best, "bad_evals": self.bad_evals,
                                   "stopped": self.stopped_early},
                "algo": self.algo.state_dict(),
                "clock": dict(self.clock),
            },
        }

    def restore(self, parts: Mapping[str, Any], *, shards: Any = None, same_world: bool = True,
                source: str = "the checkpoint", step: int | None = None) -> None:
        """Put this run back where ``parts`` (and, sharded, ``shards``: a DCP reader) say, once
        their structure is checked (``step``: the checkpoint's own). Parts that do not have the
        structure this WMTP writes (a crafted or foreign file) are an :class:`UnusableError`
        naming ``source`` (the caller quarantines the checkpoint); weights written by a run of
        another model than this one, a :class:`CheckpointError` (this run's settings are wrong,
        not the checkpoint)."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            check_restorable(parts, source=source, step=step, sharded=shards is not None,
                             scheduler=self.scheduler.state_dict(), clock=self.clock, windows=len(self.stream.data))
            self._restore(parts, shards, same_world)
        except WmtpError:
            raise
        except CheckpointException as e:  # a BaseException: it would escape every handler
            failures = [exc for exc, _ in e.failures.values()]
            first = next((f for f in failures if isinstance(f, CheckpointError)), failures[0] if failures else e)
            raise refusal(parts, self.base.record, f"{source} could not be loaded ({first_line(first)})") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise refusal(parts, self.base.record, f"{source} does not hold resume state this run can continue "
                                       f"from ({type(e).__name__}: {first_line(e)})") from None

    def _restore(self, parts: Mapping[str, Any], shards: Any, same_world: bool) -> None:
        if shards is not None:  # sharded: resharded to this world, whatever size wrote it
            distributed.load_sharded(self.model, self.optimizer, shards)
        elif self.fsdp:
            raise CheckpointError("this checkpoint was written without FSDP; resume it with "
                                  "devices.fsdp.enabled: false")
        else:
            self.model.load_state_dict(parts["model"])
            self.optimizer.load_state_dict(parts["optimizer"])
        t = parts["trainer"]
        self.step = int(t["step"])
        self.scheduler.load_state_dict(t["scheduler"])
        self.stream.load_state_dict(t["data"])
        es = t["early_stopping"]
        self.best, self.bad_evals, self.stopped_early = es["best"], int(es["bad_evals"]), bool(es["stopped"])
        self.algo.load_state_dict(t["algo"])
        self.losses = [float(x) for x in t["losses"]]
        clock = t.get("clock") or {}
        self.clock = {"trained": float(clock.get("trained", 0.0)), "last_save": float(clock.get("last_save", 0.0))}
        if t.get("scaler"):
            self.scaler.load_state_dict(t["scaler"])
        if same_world:
            restore_rng(t["rng"])
        else:  # another world size: fresh, distinct streams per rank (same trajectory, not bit-exact)
            torch.manual_seed(self.settings.config.seed + 1000 * self.step + self.world.rank)

    # -- loop ------------------------------------------------------------------------------
    def train(self, on_step: Callable[[int, Mapping[str, float]], None],
              checkpoint: Callable[[int, Mapping[str, float]], None],
              stop: Callable[[], str | None] = lambda: None) -> Outcome:
        """Train to the end, calling ``on_step(step, metrics)`` after every step (stage-1
        critic steps too) and ``checkpoint(step, metrics)`` when resume state is due: every
        ``save_interval`` steps, or once ``save_every`` of training time passed since the last
        save. ``stop()`` names a signal that asks the run to stop (preemption): the step is
        finished, every rank agrees on it, and the outcome is ``preempted`` at that step (the
        caller commits it). One that arrived before training began stops it before any step."""
        ckpt = self.settings.config.paths.checkpoints
        every = duration_seconds(ckpt.save_every) if ckpt.save_every else None
        out = Outcome(last_step=self.step)
        if self.world.agree(0.0, stop() is not None)[1]:  # every rank: a signal while the run started
            out.status = "preempted"
            out.reason = f"preempted by {stop() or 'a signal to another rank'} before step {self.step + 1}"
            out.losses = list(self.losses)
            return self._finish(out)
        self.model.train()
        if self.step == 0 and isinstance(self.algo, CriticWMTP) and not self.algo.pretrained:
            self.pretrain_critic(on_step)
        if self.stopped_early:
            # a run that stopped early stays stopped when resumed
            out.status, out.reason = "stopped_early", "early stopping had already ended this run"
            out.losses = list(self.losses)
            out.last_step = self.step
            return self._finish(out)
        while self.step < self.total_steps:
            loss, metrics = self._step()
            if not self._after_step(loss, metrics, out, every, on_step, checkpoint, stop):
                break
        out.last_step = self.step
        out.losses = list(self.losses)
        return self._finish(out)

    def _step(self) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimisation step on this rank's rows of the next ``grad_accum_steps`` batches;
        its training time is counted (``save_every``). Returns this rank's loss and the step's
        metrics (each the mean over the micro-batches)."""
        import time

        optim = self.settings.recipe.optim
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self._accumulate()
        if optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.clock["trained"] += time.perf_counter() - started
        return loss, metrics

    def _accumulate(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward over each micro-batch, each loss weighing ``1 / grad_accum_steps``:
        the gradient of the mean of the micro-batches' losses. Under FSDP2 the gradients are
        reduced across ranks once, after the last micro-batch."""
        losses, sums = [], {}
        for i in range(self.accum):
            if self.fsdp and self.accum > 1:
                self.model.set_requires_gradient_sync(i == self.accum - 1)
            ids, lengths = self._local(self.stream.next())
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss, metrics = self.algo.loss(self.model, ids, lengths)
            self.scaler.scale(loss / self.accum if self.accum > 1 else loss).backward()
            losses.append(loss.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        if self.accum == 1:
            return losses[0], metrics
        return torch.stack(losses).mean(), {k: v / self.accum for k, v in sums.items()}

    def _after_step(self, loss: torch.Tensor, metrics: dict[str, float], out: Outcome, every: float | None,
                    on_step: Callable[[int, Mapping[str, float]], None],
                    checkpoint: Callable[[int, Mapping[str, float]], None],
                    stop: Callable[[], str | None]) -> bool:
        """What follows a step: the ranks agree on the loss and on whether to stop or save (one
        collective), the step is reported, evaluated, saved when due. Returns ``False`` when the
        run stops here; ``out`` then says why."""
        recipe, cfg = self.settings.recipe, self.settings.config
        ckpt = cfg.paths.checkpoints
        timed = every is not None and self.clock["trained"] - self.clock["last_save"] >= every
        # one collective a step: the mean loss, and whether any rank was signalled or is due
        value, signalled, timed = self.world.agree(float(loss.detach()), stop() is not None, timed)
        if not math.isfinite(value):
            out.status, out.reason = "failed", f"loss became {value} at step {self.step}"
            return False
        metrics.update(loss=value, lr=self.scheduler.get_last_lr()[0])
        self.losses.append(value)
        if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
            metrics["eval_loss"] = self.evaluate()
        on_step(self.step, metrics)
        out.metrics = metrics
        # decide before saving, so the saved state already holds this step's verdict
        if "eval_loss" in metrics and self._should_stop(metrics):
            self.stopped_early = True
        if signalled:
            self._before_save(metrics)  # the caller commits this step
            out.status = "preempted"
            out.reason = f"preempted by {stop() or 'a signal to another rank'} at step {self.step}"
            return False
        if (ckpt.save_interval and self.step % ckpt.save_interval == 0) or timed:
            self._before_save(metrics)
            checkpoint(self.step, metrics)
        if self.stopped_early:
            out.status = "stopped_early"
            out.reason = (f"early stopping: {recipe.train.early_stopping.monitor} did not improve "
                          f"by {recipe.train.early_stopping.min_delta} for {self.bad_evals} evaluations "
                          f"(best {self.best:.4f}) at step {self.step}")
            return False
        return True

    def _before_save(self, metrics: dict[str, float]) -> None:
        """Every checkpoint records the metric ``keep_best`` ranks it by, and restarts the clock."""
        best = self.settings.config.paths.checkpoints.keep_best
        if best is not None and best.monitor == "eval_loss" and "eval_loss" not in metrics:
            metrics["eval_loss"] = self.evaluate()
        self.clock["last_save"] = self.clock["trained"]

    def _finish(self, out: Outcome) -> Outcome:
        if out.losses:
            out.first_loss, out.last_loss = out.losses[0], out.losses[-1]
        return out

    def pretrain_critic(self, on_step: Callable[[int, Mapping[str, float]], None]) -> None:
        """critic-wmtp stage 1: fit the value head to GAE returns with the model frozen."""
        pre = self.settings.recipe.pretrain
        if pre.enabled and pre.max_steps:
            opt = torch.optim.AdamW(self.algo.value_head.parameters(), lr=pre.lr, foreach=False)
            best, bad = None, 0
            for i in range(1, pre.max_steps + 1):
                ids, lengths = self._local(self.stream.next())
                vloss, _, value = self.algo.value_loss(self.model, ids, lengths=lengths)
                opt.zero_grad(set_to_none=True)
                vloss.backward()
                opt.step()
                on_step(i, {"pretrain_value_loss": value})
                es = pre.early_stopping
                if es.enabled:
                    if best is None or value < best - es.min_delta:
                        best, bad = value, 0
                    else:
                        bad += 1
                        if bad >= es.patience:
                            break
        self.algo.pretrained = True

    def evaluate(self) -> float:
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            losses = []
            for batch in self.eval_set:
                ids, lengths = self._on_device(batch)
                ce, mask = head_ce(self.model(ids), ids, lengths)
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

    def _local(self, batch: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's rows of the global batch, on this rank's device."""
        ids, lengths = batch
        if self.world.size > 1:
            rows = slice(self.world.rank, None, self.world.size)
            ids, lengths = ids[rows], lengths[rows] if lengths is not None else None
        return self._on_device((ids, lengths))

    def _on_device(self, batch: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, lengths = batch
        return ids.to(self.device), lengths.to(self.device) if lengths is not None else None

    # -- what leaves -----------------------------------------------------------------------
    def resume_payload(self) -> Payload:
        """This step's resume state, as the router hands it to the resume sink."""
        return Payload(parts=self.state(), sharded=("model", "optimizer") if self.fsdp else ())

    def final_payload(self, dtype: str = "fp32", max_shard_size: int | str | None = None) -> Payload | None:
        """The full weights for the final role, in ``dtype`` (``fp32``, ``bf16``, ``fp16``); under
        FSDP a collective whose result only rank 0 keeps (``None`` elsewhere). A Hugging Face
        model also comes as a folder (see :func:`wmtp_core.engine.hf.export`), its weights split
        past ``max_shard_size``, which the caller removes once it is stored; under FSDP it is
        gathered and written one shard at a time (:mod:`wmtp_core.engine.final_shards`)."""
        cast = DTYPES[dtype]
        example = self.eval_set[0][0][:2].cpu() if self.eval_set else torch.zeros(2, 8, dtype=torch.long)
        meta = {"algo": self.settings.recipe.train.algo, "step": self.step, "dtype": dtype}
        if self.base.is_hf:
            meta["base_model"] = self.base.record["base"]
        if self.fsdp and self.base.is_hf:
            written = final_shards.write(self.model, self.world, cast, max_shard_size, self.base.tokenizer, meta)
            if written is not False:  # False: not written this way; gathered whole below
                return None if written is True else Payload(
                    parts={"model": final_shards.folder_weights(*written)}, example_input=example,
                    model_config=dict(self.base.record), folder=written[0])
        weights = distributed.full_weights(self.model) if self.fsdp else cpu_copy(self.model.state_dict())
        if not self.world.is_main:
            return None
        weights = {k: v.to(cast) if v.is_floating_point() else v for k, v in weights.items()
                   if not k.startswith("value_head.")}
        return final_payload(weights, self.base.record, "the trained model", dtype=cast, example=example,
                             tokenizer=self.base.tokenizer if self.base.is_hf else None, meta=meta,
                             max_shard_size=max_shard_size)
