"""The configuration and recipe, as attrs classes with the keys the origin's users write.

``config`` says where (paths, MLflow, devices, storage bindings); ``recipe`` says what (the
algorithm, optimisation, data, loss, model). Every field's docstring is its documentation.
Fields marked ``unused`` are accepted for compatibility and reported under ``--verbose``.
"""

from __future__ import annotations

from typing import Any

import attrs

from wmtp_core.config import spellings
from wmtp_core.config.eval_schema import EvalSection
from wmtp_core.validators import (
    MAX_REPEATS,
    MAX_ROWS,
    MAX_SECONDS,
    SIZE_ACCEPTED,
    check,
    count,
    count_or_null,
    count_or_zero,
    file_size,
    fraction,
    int_range,
    is_int,
    is_number,
    non_negative,
    one_of,
    positive,
)

UNUSED = {"unused": True}


_num = is_number
_int = is_int


# ----------------------------------------------------------------------------- config
@attrs.frozen
class ModelPaths:
    base: str | None = None
    """A pretrained causal LM to fine-tune: a Hugging Face folder (``config.json``, safetensors
    weights, tokenizer files) at any fsspec URL, or a ``models:/`` URI; null trains the built-in
    byte-level model from scratch."""
    rm: str | None = None
    """Reward model for critic-wmtp (a Hugging Face folder, ``models:/`` or checkpoint URI); null:
    pseudo-rewards."""
    ref: str | None = None
    """Reference model for rho1-wmtp (a Hugging Face folder, ``models:/NAME/VERSION`` or a
    checkpoint URI)."""
    trust_remote_code: bool = False
    """Allow Python code shipped in a model folder (``auto_map``, ``*.py``) to run when it is
    loaded. Off: such a folder is refused, naming the file."""


def _signal_ok(name: Any) -> bool:
    import signal

    return isinstance(name, str) and name.startswith("SIG") and hasattr(signal, name) \
        and name not in ("SIGKILL", "SIGSTOP")


def duration_seconds(value: Any) -> float | None:
    """``"90s"``, ``"30m"``, ``"2h"`` (or ``"1.5h"``) in seconds; ``None`` when it is not one."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh])\s*", value) if isinstance(value, str) else None
    seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)] if m else 0.0
    return seconds if 0 < seconds <= MAX_SECONDS else None


@attrs.frozen
class KeepBest:
    k: int = attrs.field(validator=count)
    """How many of the best committed checkpoints to keep."""
    monitor: str = "eval_loss"
    """The metric, as the run logs it (``eval_loss``, ``loss``...)."""
    mode: str = attrs.field(default="min", validator=one_of("min", "max"))


@attrs.frozen
class Checkpoints:
    base_path: str = attrs.field(
        default="file://./checkpoints",
        validator=check(lambda v: isinstance(v, str) and v.strip() != "",
                        "accepted: an fsspec URL such as file://./checkpoints or s3://bucket/prefix"),
    )
    """Where resume state lives: ``<base_path>/<run>/step_<N>/``. The protocol picks the resume sink."""
    save_interval: int = attrs.field(default=25, validator=count_or_zero)
    """Save resume state every N steps (0: only at the end)."""
    keep_last: int = attrs.field(default=2, validator=count)
    """Committed resume checkpoints kept per run; older ones are deleted after each commit."""
    keep_every: int = attrs.field(default=0, validator=count_or_zero)
    """Also keep every checkpoint whose step is a multiple of this, forever (0: none)."""
    save_final: bool = True
    """Store the final model through the final role's sink at the end of the run."""
    async_: bool = attrs.field(default=False, metadata={"key": "async"})
    """Stage the state in memory and write it in the background."""
    save_on_signal: list[str] = attrs.field(factory=lambda: ["SIGTERM", "SIGUSR1"], validator=check(
        lambda v: isinstance(v, list) and all(_signal_ok(s) for s in v),
        "accepted: a list of signal names such as SIGTERM, SIGUSR1, SIGINT (not SIGKILL or SIGSTOP); [] for none"))
    """On these signals, finish the step, commit a resume checkpoint and exit 4 (preempted,
    resumable with ``--resume latest``). ``[]``: off."""
    save_every: str | None = attrs.field(default=None, validator=check(
        lambda v: v is None or duration_seconds(v) is not None,
        "accepted: a duration such as '90s', '30m' or '2h' (at most a year), or null"))
    """Also save when this much training time passed since the last save (beside ``save_interval``)."""
    keep_best: KeepBest | None = None
    """Also keep the ``k`` best committed checkpoints by a metric (null: none)."""


@attrs.frozen
class Paths:
    models: ModelPaths = attrs.field(factory=ModelPaths)
    datasets: dict[str, str] = attrs.field(factory=dict)
    """Named data sources: any fsspec URL to text or jsonl files; ``stdlib`` is built in."""
    checkpoints: Checkpoints = attrs.field(factory=Checkpoints)


@attrs.frozen
class Mlflow:
    experiment: str = "wmtp"
    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking store; the default is a sqlite file in the working directory."""
    registry_uri: str | None = None
    """Model registry; null: the tracking store."""


@attrs.frozen
class Distributed:
    enabled: bool | None = None
    """null: on when launched by torchrun with WORLD_SIZE > 1."""
    init_method: str = attrs.field(default="env://", validator=one_of("env://"))
    """How ranks find each other: ``env://``, the variables torchrun sets (the only launcher)."""
    find_unused_parameters: bool = attrs.field(default=False, metadata=UNUSED)
    """A DDP setting; FSDP2 has no unused-parameter search (accepted for compatibility)."""
    backend: str | None = attrs.field(default=None, converter=spellings.lower,
                                      validator=check(lambda v: v in (None, "gloo", "nccl"),
                                                      "accepted: gloo, nccl, or null (nccl on GPU, gloo on CPU)"))
    timeout: int = attrs.field(default=1800, validator=int_range(1, MAX_SECONDS))
    """Seconds a collective may wait before the run fails."""


@attrs.frozen
class Fsdp:
    enabled: bool = False
    """Shard the trunk and heads with FSDP2 (``fully_shard``); resume state is then written by
    every rank through ``torch.distributed.checkpoint`` (works on one process too)."""
    sharding: str = attrs.field(default="full_shard", converter=spellings.sharding,
                                validator=one_of("full_shard", "shard_grad_op"))
    """full_shard (also ``full``): parameters resharded after forward; shard_grad_op (also
    ``grad_op``): kept gathered until backward."""
    auto_wrap: str | bool = attrs.field(default="block", converter=spellings.auto_wrap, validator=one_of("block", "none"))
    """block (also ``true``): every transformer block (a Hugging Face model's decoder layers) is
    its own FSDP unit; none (also ``false``): the whole model is one."""
    activation_ckpt: bool = False
    """Recompute block activations in backward (less memory, more compute)."""
    offload_params: bool = False
    """Keep sharded parameters on the CPU (FSDP2 CPUOffloadPolicy)."""
    offload_grads: bool = False
    """Keep gradients on the CPU. FSDP2 offloads gradients together with parameters, so either
    flag turns on its CPUOffloadPolicy."""


@attrs.frozen
class Devices:
    compute_backend: str = attrs.field(default="cpu", validator=one_of("cpu", "cuda", "mps", "auto"))
    mixed_precision: str = attrs.field(default="no", validator=one_of("no", "fp32", "bf16", "fp16"))
    num_proc: int = attrs.field(default=1, validator=int_range(0, 4096), metadata=UNUSED)
    """Tokenizer processes (0: none); tokenization runs in the training process."""
    distributed: Distributed = attrs.field(factory=Distributed)
    fsdp: Fsdp = attrs.field(factory=Fsdp)


@attrs.frozen
class RoleStorage:
    sink: str
    """Name of an installed sink (``wmtp plugins`` lists them)."""
    base_path: str | None = None
    """For file-like sinks: overrides ``paths.checkpoints.base_path``."""
    options: dict[str, Any] = attrs.field(factory=dict)
    """Passed to the sink (fsspec storage options for file-like sinks)."""
    from_: str = attrs.field(default="last", validator=one_of("last", "best"), metadata={"key": "from"})
    """For the final role: store the last step's weights, or (``best``) those of the best
    checkpoint ``paths.checkpoints.keep_best`` ranks first."""
    dtype: str = attrs.field(default="fp32", validator=one_of("fp32", "bf16", "fp16"))
    """For the final role: the dtype its weights are stored in (the resume state keeps full
    precision)."""
    max_shard_size: int | str | None = attrs.field(default=None, validator=check(
        lambda v: v is None or file_size(v) is not None, SIZE_ACCEPTED))
    """For the final role: a Hugging Face final model larger than this is stored as sharded
    safetensors (``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``), as
    ``save_pretrained(max_shard_size=...)`` writes it; under FSDP rank 0 gathers and writes one
    shard at a time. ``"5GB"``, ``"500MB"``, ``"10KiB"`` or bytes; null: transformers' own default
    (its ``save_pretrained``'s ``max_shard_size``)."""


@attrs.frozen
class ResumeStorage(RoleStorage):
    """``storage.resume``: the keys of a role's storage that apply to the resume state."""

    max_shard_size: int | str | None = attrs.field(default=None, validator=check(
        lambda v: v is None, "accepted: only null here; max_shard_size splits the final model "
        "(storage.final.max_shard_size); the resume state is written whole per rank (FSDP: DCP shards)"))
    """Not for the resume role: set ``storage.final.max_shard_size``."""


@attrs.frozen
class PolicyEntry:
    policy: str
    role: str = attrs.field(validator=one_of("resume", "final"))
    options: dict[str, Any] = attrs.field(factory=dict)
    """Passed to the policy (``keep_last``, ``keep_every`` for the built-in one)."""


@attrs.frozen
class Storage:
    """Explicit role bindings. Without this section they follow from ``paths`` and ``mlflow``."""

    resume: ResumeStorage | None = None
    final: RoleStorage | None = None
    policies: list[PolicyEntry] | None = None
    """Retention policies; null: ``keep_last`` from ``paths.checkpoints``. ``[]``: keep everything."""


@attrs.frozen
class Config:
    project: str = "wmtp"
    seed: int = attrs.field(default=42, validator=int_range(0, 2**63 - 1))
    log_interval: int = attrs.field(default=10, validator=count)
    """Print and evaluate every N steps."""
    paths: Paths = attrs.field(factory=Paths)
    mlflow: Mlflow | None = attrs.field(factory=Mlflow)
    """null: no MLflow tracking; the final model then needs a sink such as ``local``."""
    launcher: dict[str, Any] = attrs.field(factory=dict, metadata=UNUSED)
    devices: Devices = attrs.field(factory=Devices)
    storage: Storage | None = None


# ----------------------------------------------------------------------------- recipe
@attrs.frozen
class Run:
    name: str | None = None
    """Run name; null: ``<algo>-<timestamp>``. The folder under the base path."""
    tags: list[str] = attrs.field(factory=list)


@attrs.frozen
class EarlyStopping:
    enabled: bool = False
    patience: int = attrs.field(default=3, validator=count)
    """Evaluations without improvement before the run stops."""
    min_delta: float = attrs.field(default=0.0, validator=non_negative)
    monitor: str = attrs.field(default="eval_loss", converter=spellings.monitor,
                               validator=one_of("eval_loss", "loss", "value_loss"))
    """eval_loss, loss (also ``wmtp_loss``: the weighted training loss) or value_loss."""
    mode: str = attrs.field(default="min", converter=spellings.mode, validator=one_of("min", "max"))
    """min or max; ``loss_only`` (the origin's name for watching a loss alone) means min."""


@attrs.frozen
class Pretrain:
    """critic-wmtp stage 1: train the value head before the main loop."""

    enabled: bool = True
    num_epochs: int = attrs.field(default=1, validator=int_range(1, MAX_REPEATS), metadata=UNUSED)
    """Stage 1 runs ``max_steps`` steps (accepted for compatibility)."""
    max_steps: int = attrs.field(default=20, validator=count_or_zero)
    lr: float = attrs.field(default=1e-3, validator=positive)
    save_value_head: bool = attrs.field(default=True, metadata=UNUSED)
    """The value head is always part of the resume state (accepted for compatibility)."""
    early_stopping: EarlyStopping = attrs.field(factory=EarlyStopping)


@attrs.frozen
class Train:
    algo: str = attrs.field(default="baseline-mtp", validator=one_of("baseline-mtp", "rho1-wmtp", "critic-wmtp"))
    full_finetune: bool = attrs.field(default=True, metadata=UNUSED)
    num_epochs: int = attrs.field(default=1, validator=int_range(1, MAX_REPEATS))
    max_steps: int | None = attrs.field(default=100, validator=count_or_null)
    """Stop after this many optimiser steps (null: run ``num_epochs`` epochs)."""
    grad_accum_steps: int = attrs.field(default=1, validator=int_range(1, MAX_REPEATS))
    """Micro-batches per optimiser step (the HF Trainer's ``gradient_accumulation_steps``): a step
    sees ``data.train.batch_size`` x ranks x this many rows, one micro-batch in memory at a time."""
    early_stopping: EarlyStopping = attrs.field(factory=EarlyStopping)


@attrs.frozen
class Optim:
    optimizer: str = attrs.field(default="adamw", validator=one_of("adamw"))
    lr: float = attrs.field(default=3e-3, validator=positive)
    weight_decay: float = attrs.field(default=0.01, validator=non_negative)
    betas: list[float] = attrs.field(
        factory=lambda: [0.9, 0.95],
        validator=check(lambda v: len(v) == 2 and all(_num(b) and 0 <= b < 1 for b in v),
                        "accepted: two numbers in [0, 1), e.g. [0.9, 0.95]"),
    )
    grad_clip: float = attrs.field(default=1.0, validator=non_negative)
    """Max gradient norm (0: no clipping)."""
    scheduler: str = attrs.field(default="cosine", validator=one_of("constant", "linear", "cosine"))
    warmup_ratio: float = attrs.field(default=0.05, validator=fraction)


@attrs.frozen
class DataSplit:
    sources: list[str] = attrs.field(factory=lambda: ["stdlib"])
    """Names from ``paths.datasets``, or the built-in ``stdlib``."""
    max_length: int = attrs.field(default=128, validator=int_range(2, MAX_ROWS))
    batch_size: int = attrs.field(default=8, validator=int_range(1, MAX_ROWS))
    pack_sequences: bool = True


@attrs.frozen
class Data:
    train: DataSplit = attrs.field(factory=DataSplit)
    eval: DataSplit | None = None
    """Held-out data; null: the last 5% of the training windows."""


@attrs.frozen
class Loss:
    weight_norm: str = attrs.field(default="softmax", validator=one_of("softmax", "mean1.0_clip", "none"))
    """How rho1-wmtp and critic-wmtp finish their head weights: ``softmax`` over heads, each capped
    at ``max_weight``; ``mean1.0_clip``: the softmax weights scaled so their mean over the batch
    is 1, then clipped at ``max_weight``; ``none``: the softmax weights, no cap."""
    lambda_: float = attrs.field(default=1.0, validator=positive, metadata={"key": "lambda"})
    """Scale of the baseline-mtp loss."""
    weight_temperature: float = attrs.field(default=1.0, validator=positive)
    epsilon: float = attrs.field(default=1e-8, validator=non_negative)
    max_weight: float | None = attrs.field(
        default=None, validator=check(lambda v: v is None or (_num(v) and v > 0), "accepted: a number > 0, or null"))
    """Cap on a single weight before normalisation (null: no cap)."""


@attrs.frozen
class Critic:
    target: str = attrs.field(default="gae", validator=one_of("gae", "returns", "rm_sequence"), metadata=UNUSED)
    token_spread: str = attrs.field(default="uniform", validator=one_of("uniform", "last", "gae"))
    """How a sequence's reward reaches its tokens: ``uniform`` (R/T on every token), ``last`` (all
    on the last token), ``gae`` (on the last token; GAE carries it back: the same as ``last``)."""
    delta_mode: str = attrs.field(default="td", validator=one_of("td", "diff"), metadata=UNUSED)
    normalize: str | bool = attrs.field(default="zscore", converter=spellings.normalize, validator=one_of("zscore", "none"))
    """Standardise rewards over the batch: ``zscore`` (also ``true``) or ``none`` (also ``false``)."""
    discount_lambda: float = attrs.field(default=0.95, validator=fraction)
    gamma: float = attrs.field(default=0.99, validator=fraction)
    gae_lambda: float = attrs.field(default=0.95, validator=fraction)
    auxiliary_loss_coef: float = attrs.field(default=0.1, validator=non_negative)
    value_lr: float = attrs.field(default=1e-3, validator=positive)
    use_pseudo_rewards: bool = True


@attrs.frozen
class Rho1:
    selection_mode: str = attrs.field(default="weighted", validator=one_of("weighted", "token_skip"))
    skip_threshold_percentile: float = attrs.field(default=0.3, validator=fraction)
    min_ce_diff: float = attrs.field(default=0.01, validator=non_negative)


@attrs.frozen
class ModelSection:
    vocab_size: int = attrs.field(default=256, validator=check(lambda v: v == 256, "accepted: 256 (byte-level tokenizer)"))
    # Upper bounds far above any real model, below sizes whose tensors torch cannot even describe.
    d_model: int = attrs.field(default=128, validator=int_range(1, 65536))
    n_layers: int = attrs.field(default=2, validator=int_range(1, 1024))
    n_heads: int = attrs.field(default=4, validator=int_range(1, 1024))
    n_future: int | None = attrs.field(default=None, validator=check(
        lambda v: v is None or (_int(v) and 1 <= v <= 256), "accepted: an integer from 1 to 256, or null"))
    """Prediction heads (head k predicts token t+k+1). null: 4, or with ``paths.models.base`` the
    heads its folder declares (``mtp_config.n_future_tokens``)."""
    max_seq_len: int = attrs.field(default=256, validator=int_range(1, 2**20))
    dropout: float = attrs.field(default=0.0, validator=check(lambda v: _num(v) and 0 <= v < 1,
                                                              "accepted: a number in [0, 1)"))
    head: str = attrs.field(default="linear", validator=one_of("linear", "transformer"))
    """With ``paths.models.base``: the extra heads' kind, a Linear from the hidden size to the
    vocabulary (the origin's) or one transformer layer feeding the base LM head."""


@attrs.frozen
class Recipe:
    run: Run = attrs.field(factory=Run)
    pretrain: Pretrain = attrs.field(factory=Pretrain)
    train: Train = attrs.field(factory=Train)
    optim: Optim = attrs.field(factory=Optim)
    data: Data = attrs.field(factory=Data)
    loss: Loss = attrs.field(factory=Loss)
    critic: Critic = attrs.field(factory=Critic)
    rho1: Rho1 = attrs.field(factory=Rho1)
    model: ModelSection = attrs.field(factory=ModelSection)
    eval: EvalSection | None = None
    """pass@k on code tasks while the run trains and of its final model (null: none)."""
