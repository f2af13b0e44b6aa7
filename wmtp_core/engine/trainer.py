"""The training loop. It writes no storage and knows no sink: it hands its state to the
callback the run session gives it, and the session emits it through the router."""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Mapping

import attrs
import torch

from wmtp_core.config import Settings
from wmtp_core.engine import data as data_mod
from wmtp_core.engine import distributed
from wmtp_core.engine.algorithms import (
    Algorithm,
    BaselineMTP,
    CriticWMTP,
    Rho1WMTP,
    head_ce,
    weighted_loss,
)
from wmtp_core.engine.model import ModelConfig, MTPModel, model_from_weights
from wmtp_core.engine.optim import build_optimizer, build_scheduler
from wmtp_core.engine.state import restore_rng, rng_state
from wmtp_core.errors import (
    CheckpointError,
    DataError,
    DeviceError,
    ModelLoadError,
    TrainingError,
    WmtpError,
)
from wmtp_core.events import LoadedModel, Payload
from wmtp_core.tensors import cpu_copy

LoadModel = Callable[[str], LoadedModel]
"""Resolves a model URI to weights and architecture (the ``wmtp_load_model`` hook); raises a
:class:`~wmtp_core.errors.WmtpError` when it cannot."""


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


def model_config(settings: Settings) -> ModelConfig:
    m = settings.recipe.model
    return ModelConfig(vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                       n_heads=m.n_heads, n_future=m.n_future, max_seq_len=m.max_seq_len,
                       dropout=m.dropout)


def choose_device(backend: str) -> torch.device:
    """Honour ``devices.compute_backend`` or refuse it with the reason."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if backend == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if backend == "cuda" and not cuda:
        raise DeviceError("devices.compute_backend: 'cuda' was asked for but this machine has no "
                          "usable CUDA device (torch.cuda.is_available() is False); use cpu or auto")
    if backend == "mps" and not mps:
        raise DeviceError("devices.compute_backend: 'mps' was asked for but MPS is not available "
                          "here; use cpu or auto")
    return torch.device(backend)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Honour ``devices.mixed_precision`` or refuse it with the reason."""
    if precision in ("no", "fp32"):
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("devices.mixed_precision: 'bf16' is not supported by this GPU; use fp16 or no")
        return torch.bfloat16
    if device.type != "cuda":
        raise DeviceError(f"devices.mixed_precision: 'fp16' needs a CUDA device (this run uses "
                          f"{device.type}); use bf16 or no")
    return torch.float16


def resolve_model(load: LoadModel, uri: str, key: str) -> MTPModel:
    """A frozen model from a URI: ``load`` resolves it (plugins, or the core for committed
    checkpoints); its architecture and weights are checked before the module is built."""
    try:
        loaded = load(uri)
        if not isinstance(loaded, LoadedModel):
            raise ModelLoadError(f"{uri!r} did not resolve to a model")
        model = model_from_weights(dict(loaded.model_config), dict(loaded.weights), uri)
    except WmtpError as e:
        message = str(e) if uri in str(e) else f"{uri!r} could not be loaded: {e}"
        raise ModelLoadError(f"{key}: {message}") from None
    return model.eval().requires_grad_(False)


def check_algorithm(settings: Settings) -> None:
    """Refuse an algorithm whose requirements the configuration does not meet, before anything
    starts (the dry run calls it too, so it refuses in the same words)."""
    recipe, cfg = settings.recipe, settings.config
    algo = recipe.train.algo
    if algo == "rho1-wmtp" and not cfg.paths.models.ref:
        raise TrainingError(f"{settings.config_source}: paths.models.ref is required by rho1-wmtp: "
                            "a models:/NAME/VERSION URI or a committed checkpoint URI")
    if algo == "critic-wmtp" and cfg.paths.models.rm is None and not recipe.critic.use_pseudo_rewards:
        raise TrainingError(f"{settings.config_source}: paths.models.rm is null and "
                            "critic.use_pseudo_rewards is false: give a reward model or allow pseudo-rewards")
    if algo == "critic-wmtp" and cfg.devices.fsdp.enabled:
        raise TrainingError("devices.fsdp.enabled: critic-wmtp is not supported under FSDP yet "
                            "(its value head lives outside the sharded model); disable fsdp")


def build_algorithm(settings: Settings, load: LoadModel, d_model: int) -> Algorithm:
    recipe, cfg = settings.recipe, settings.config
    algo = recipe.train.algo
    check_algorithm(settings)
    if algo == "baseline-mtp":
        return BaselineMTP(scale=recipe.loss.lambda_)
    if algo == "rho1-wmtp":
        ref = cfg.paths.models.ref
        return Rho1WMTP(resolve_model(load, ref, "paths.models.ref"),
                        mode=recipe.rho1.selection_mode, min_ce_diff=recipe.rho1.min_ce_diff,
                        skip_percentile=recipe.rho1.skip_threshold_percentile,
                        temperature=recipe.loss.weight_temperature,
                        max_weight=recipe.loss.max_weight, epsilon=recipe.loss.epsilon)
    rm = cfg.paths.models.rm
    reward = resolve_model(load, rm, "paths.models.rm") if rm else None
    return CriticWMTP(d_model, recipe.critic, recipe.loss.weight_temperature, reward,
                      max_weight=recipe.loss.max_weight, epsilon=recipe.loss.epsilon)


def check_source(settings: Settings, name: str, key: str = "data.train.sources") -> None:
    """The source is built in or named in ``paths.datasets``, and its URL holds data."""
    datasets = settings.config.paths.datasets
    if name not in datasets and name != data_mod.STDLIB:
        raise DataError(
            f"{key}: data source {name!r} is neither built in ({data_mod.STDLIB!r}) nor a key of "
            f"paths.datasets (defined: {', '.join(sorted(datasets)) or 'none'})"
        )
    url = datasets.get(name, data_mod.STDLIB)
    if url != data_mod.STDLIB:
        data_mod.files_of(url, f"paths.datasets.{name}")


def load_documents(settings: Settings, sources: list[str]) -> list[bytes]:
    docs: list[bytes] = []
    datasets = settings.config.paths.datasets
    for name in sources:
        check_source(settings, name)
        url = datasets.get(name, data_mod.STDLIB)
        docs += data_mod.stdlib_documents() if url == data_mod.STDLIB else \
            data_mod.url_documents(url, key=f"paths.datasets.{name}")
    return docs


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
        self._setup(load)

    # -- setup -----------------------------------------------------------------------------
    def _setup(self, load: LoadModel) -> None:
        cfg, recipe = self.settings.config, self.settings.recipe
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.device = choose_device(cfg.devices.compute_backend)
        self.amp = autocast_dtype(cfg.devices.mixed_precision, self.device)
        self.model_cfg = model_config(self.settings)
        self.model = MTPModel(self.model_cfg).to(self.device)
        devices = cfg.devices
        self.fsdp = devices.fsdp.enabled
        check_algorithm(self.settings)
        if self.fsdp:
            self.model.activation_checkpointing = devices.fsdp.activation_ckpt
            distributed.shard(self.model, devices.fsdp)
        self.algo = build_algorithm(self.settings, load, self.model_cfg.d_model).to(self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp is torch.float16)
        self.losses: list[float] = []
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
        # the stream yields the global batch; each rank trains on its own rows of it
        self.stream = data_mod.BatchStream(train_w, split.batch_size * self.world.size, seed=cfg.seed)
        eval_bs = recipe.data.eval.batch_size if recipe.data.eval is not None else split.batch_size
        self.eval_set = data_mod.eval_batches(eval_w, eval_bs)
        per_epoch = self.stream.batches_per_epoch * recipe.train.num_epochs
        self.total_steps = min(recipe.train.max_steps or per_epoch, per_epoch)
        groups = [{"params": list(self.model.parameters())}, *self.algo.param_groups()]
        self.optimizer = build_optimizer(groups, recipe.optim)
        self.scheduler = build_scheduler(self.optimizer, recipe.optim, self.total_steps)

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
                "model_config": attrs.asdict(self.model_cfg),
                "losses": list(self.losses),
                "scaler": self.scaler.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "data": self.stream.state_dict(),
                "early_stopping": {"best": self.best, "bad_evals": self.bad_evals,
                                   "stopped": self.stopped_early},
                "algo": self.algo.state_dict(),
            },
        }

    def restore(self, parts: Mapping[str, Any], *, shards: Any = None, same_world: bool = True,
                source: str = "the checkpoint") -> None:
        """Put this run back where ``parts`` (and, sharded, ``shards``: a DCP reader) say. Parts
        that do not have the shape this WMTP writes (a crafted or foreign file) are a
        :class:`CheckpointError` naming ``source``."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            self._restore(parts, shards, same_world)
        except WmtpError:
            raise
        except CheckpointException as e:  # a BaseException: it would escape every handler
            failures = [exc for exc, _ in e.failures.values()]
            first = next((f for f in failures if isinstance(f, CheckpointError)), failures[0] if failures else e)
            detail = (str(first).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(f"{source} could not be loaded ({detail})") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            detail = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(f"{source} does not hold resume state this run can continue "
                                  f"from ({type(e).__name__}: {detail})") from None

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
        if t.get("scaler"):
            self.scaler.load_state_dict(t["scaler"])
        if same_world:
            restore_rng(t["rng"])
        else:  # another world size: fresh, distinct streams per rank (same trajectory, not bit-exact)
            torch.manual_seed(self.settings.config.seed + 1000 * self.step + self.world.rank)

    # -- loop ------------------------------------------------------------------------------
    def train(self, on_step: Callable[[int, Mapping[str, float]], None],
              checkpoint: Callable[[int, Mapping[str, float]], None]) -> Outcome:
        """Train to the end, calling ``on_step(step, metrics)`` after every step (stage-1
        critic steps too) and ``checkpoint(step, metrics)`` when resume state is due."""
        recipe, cfg = self.settings.recipe, self.settings.config
        ckpt = cfg.paths.checkpoints
        out = Outcome(last_step=self.step)
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
            batch = self._local(self.stream.next()).to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss, metrics = self.algo.loss(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if recipe.optim.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, recipe.optim.grad_clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            value = self.world.mean(float(loss.detach()))
            if not math.isfinite(value):
                out.status, out.reason = "failed", f"loss became {value} at step {self.step}"
                break
            metrics.update(loss=value, lr=self.scheduler.get_last_lr()[0])
            self.losses.append(value)
            if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                metrics["eval_loss"] = self.evaluate()
            on_step(self.step, metrics)
            out.metrics = metrics
            # decide before saving, so the saved state already holds this step's verdict
            if "eval_loss" in metrics and self._should_stop(metrics):
                self.stopped_early = True
            if ckpt.save_interval and self.step % ckpt.save_interval == 0:
                checkpoint(self.step, metrics)
            if self.stopped_early:
                out.status = "stopped_early"
                out.reason = (f"early stopping: {recipe.train.early_stopping.monitor} did not improve "
                              f"by {recipe.train.early_stopping.min_delta} for {self.bad_evals} evaluations "
                              f"(best {self.best:.4f}) at step {self.step}")
                break
        out.last_step = self.step
        out.losses = list(self.losses)
        return self._finish(out)

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
                batch = self.stream.next().to(self.device)
                vloss, _ = self.algo.value_loss(self.model, batch)
                opt.zero_grad(set_to_none=True)
                vloss.backward()
                opt.step()
                value = float(vloss.detach())
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
                batch = batch.to(self.device)
                ce, mask = head_ce(self.model(batch), batch)
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

    def _local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch."""
        return batch if self.world.size == 1 else batch[self.world.rank :: self.world.size]

    # -- what leaves -----------------------------------------------------------------------
    def resume_payload(self) -> Payload:
        """This step's resume state, as the router hands it to the resume sink."""
        return Payload(parts=self.state(), world=self.world if self.fsdp else None)

    def final_payload(self) -> Payload | None:
        """The full weights for the final role; under FSDP a collective whose result only
        rank 0 keeps (``None`` elsewhere)."""
        weights = distributed.full_weights(self.model) if self.fsdp else cpu_copy(self.model.state_dict())
        if not self.world.is_main:
            return None
        module = MTPModel(self.model_cfg)
        module.load_state_dict(weights)
        module.eval()
        # two rows, so the exported program keeps a dynamic batch dimension
        example = self.eval_set[0][:2].cpu() if self.eval_set else torch.zeros(2, 8, dtype=torch.long)
        return Payload(parts={"model": weights}, model=module, example_input=example,
                       model_config=attrs.asdict(self.model_cfg))
