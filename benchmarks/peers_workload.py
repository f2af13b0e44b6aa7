"""The one workload every side of the peers benchmark trains (issue 21): the same tiny Hugging
Face causal LM with WMTP's multi-token heads, the same loss, data, seed and optimiser settings.

- **Model:** the origin's ``distilgpt2-mtp`` config (``../shared/origin-files/tests/test_models/``)
  scaled down to :data:`MODEL`, random weights from :data:`SEED`, its real GPT-2 tokenizer; the
  folder keeps the origin's ``mtp_config``/``architectures`` the way ``tests/hf_models.py`` does.
  :func:`build_mtp_model` wraps it in WMTP's own :class:`wmtp_core.engine.hf.HFMTPModel` through
  :func:`wmtp_core.engine.hf.build_mtp` (what ``wmtp_core/engine/models.py`` does), so the
  peers train exactly WMTP's module: :data:`N_FUTURE` heads, ``linear`` extra heads.
- **Loss:** WMTP's ``baseline-mtp`` (:class:`wmtp_core.engine.algorithms.BaselineMTP`).
- **Data:** MBPP train, one document per record as WMTP's corpus joins it
  (:func:`wmtp_core.engine.corpus.document_of`), tokenized and cut into unpacked rows of
  :data:`MAX_LENGTH` with WMTP's own :func:`wmtp_core.engine.data.encode`/``windows`` (each
  document ends with EOS; short rows padded, their lengths kept), each batch trimmed to its
  longest row (:func:`wmtp_core.engine.data.trimmed`). WMTP's recipe matching this:
  ``data.train: {sources: [mbpp], max_length: 128, batch_size: 4, pack_sequences: false}``.
- **Optimiser:** AdamW(:data:`LR`), torch defaults otherwise, constant LR, no warmup, no
  gradient clipping.

Also here: what the harness and the runners share — the final weights as one safetensors file
(:func:`save_weights`), a SIGKILL at a random moment of the k-th save (:class:`KillDuringSave`),
the result JSON (:func:`write_result`), this process's written bytes (:func:`io_write_bytes`),
a peer runner's frame (:func:`run_peer`) and the user code both peers' best-effort setups add to
register the final model (:func:`register`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ORIGIN = Path(__file__).resolve().parents[2] / "shared" / "origin-files"
ORIGIN_MODEL = ORIGIN / "tests" / "test_models" / "distilgpt2-mtp"
MBPP = ORIGIN / "datasets" / "mbpp"

MODEL = dict(n_layer=2, n_embd=64, n_head=4, n_positions=256)
N_FUTURE = 4
HEAD = "linear"
SEED = 1234
LR = 3e-4
BATCH = 4
MAX_LENGTH = 64
EVAL_ROWS = 32
"""Rows of MBPP validation the HF Trainer's documented setup evaluates on (``load_best_model_at_end``)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json")


# --------------------------------------------------------------------------- model
def build_model_folder(target: str) -> str:
    """A GPT-2 model folder at ``target``: the origin config scaled to :data:`MODEL`, weights
    from ``torch.manual_seed(SEED)`` as ``model.safetensors``, the origin's tokenizer files.
    The same bytes every call."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from wmtp_core.engine import hf

    hf.quiet()
    raw = json.loads((ORIGIN_MODEL / "config.json").read_text())
    keep = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(GPT2Config(**{**keep, **MODEL}))
    os.makedirs(target, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    config = json.loads(Path(target, "config.json").read_text())
    config.update(mtp_config=raw["mtp_config"], architectures=raw["architectures"])
    Path(target, "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (ORIGIN_MODEL / name).exists():
            shutil.copyfile(ORIGIN_MODEL / name, os.path.join(target, name))
    return target


def load_tokenizer(folder: str):
    """The folder's tokenizer as WMTP loads it (pad = EOS)."""
    from wmtp_core.engine import hf

    return hf.load_tokenizer(folder, "peers")


def build_mtp_model(folder: str):
    """WMTP's own MTP module for the folder: the base causal LM plus :data:`N_FUTURE` - 1 linear
    heads started from its LM head (:func:`wmtp_core.engine.hf.build_mtp`), in training mode as
    WMTP trains it (``wmtp_core/engine/trainer.py``: ``model.train()``; the config's dropout,
    0.1, is on). ``from_pretrained`` hands the base back in eval mode, and Lightning 2.x keeps
    the modes it finds."""
    from wmtp_core.engine import hf

    hf.quiet()
    info = hf.inspect(folder, "peers")
    model, _ = hf.build_mtp(info, folder, N_FUTURE, HEAD, "peers")
    return model.train()


def mtp_loss(model, ids, lengths=None):
    """WMTP's ``baseline-mtp`` loss of a batch (a scalar tensor)."""
    from wmtp_core.engine.algorithms import BaselineMTP

    loss, _ = BaselineMTP().loss(model, ids, lengths)
    return loss


# --------------------------------------------------------------------------- data
def mbpp_rows(split: str = "train") -> list[str]:
    """The documents of an MBPP split, joined as WMTP's corpus joins them (text, newline, code)."""
    from wmtp_core.engine.corpus import document_of

    records = json.loads((MBPP / f"{split}.json").read_text())
    return [document_of(r, f"mbpp/{split}.json record {i}") for i, r in enumerate(records)]


class Rows:
    """A map-style dataset of windows: item ``i`` is ``{"ids": [L] int64, "length": int}``."""

    def __init__(self, windows) -> None:
        self.ids = windows.ids.long()
        length = windows.ids.shape[1]
        self.lengths = windows.lengths if windows.lengths is not None else [length] * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"ids": self.ids[i], "length": int(self.lengths[i])}


def dataset(tokenizer, rows: list[str], max_length: int = MAX_LENGTH) -> Rows:
    """The documents as WMTP cuts them: EOS-ended, unpacked rows of ``max_length``."""
    from wmtp_core.engine import data

    return Rows(data.split_windows(rows, _Split(max_length), tokenizer))


class _Split:
    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.pack_sequences = False


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"ids": [B, L] int64, "lengths": [B] int64}``, trimmed to the batch's longest row."""
    import torch
    from wmtp_core.engine.data import trimmed

    ids = torch.stack([it["ids"] for it in items])
    lengths = torch.tensor([it["length"] for it in items], dtype=torch.int64)
    ids, lengths = trimmed(ids, lengths)
    return {"ids": ids, "lengths": lengths}


def batches(tokenizer, rows: list[str], batch: int = BATCH, max_length: int = MAX_LENGTH, seed: int = SEED):
    """A DataLoader of shuffled batches (a generator seeded with ``seed``, no workers, the last
    short batch dropped) over :func:`dataset`, collated by :func:`collate`."""
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(dataset(tokenizer, rows, max_length), batch_size=batch, shuffle=True, drop_last=True,
                      collate_fn=collate, num_workers=0, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- weights
def save_weights(model, path: str) -> str:
    """The module's full state dict (base and heads) as one safetensors file; tied tensors
    cloned, everything contiguous on the CPU."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        key = t.untyped_storage().data_ptr()
        out[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.add(key)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(out, path)
    return path


def same_weights(a: str, b: str) -> tuple[bool, list[str]]:
    """Whether two :func:`save_weights` files hold equal tensors (``torch.equal``), and the
    names that differ or are missing on one side."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    bad = sorted(set(x) ^ set(y)) + [k for k in sorted(set(x) & set(y)) if not torch.equal(x[k], y[k])]
    return not bad, bad


# --------------------------------------------------------------------------- saves
def _kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave:
    """Times every save of a run and, when ``k`` is given, SIGKILLs this process at a random
    moment of the k-th (1-based): a timer started when save k begins fires after
    ``Random(seed).uniform(0, d)`` seconds, ``d`` the median duration of the earlier saves
    (0.05 s if none); if save k ends first, the kill comes at its end, before the tool's
    bookkeeping after the save. :attr:`durations` are the saves' durations (the stalls)."""

    def __init__(self, k: int | None = None, seed: int = 0, kill: Callable[[], None] = _kill_now) -> None:
        self.k = k
        self.rng = random.Random(seed)
        self.kill = kill
        self.count = 0
        self.durations: list[float] = []
        self._start = 0.0

    def begin(self) -> None:
        self.count += 1
        self._start = time.perf_counter()
        if self.count == self.k:
            d = statistics.median(self.durations) if self.durations else 0.05
            timer = threading.Timer(self.rng.uniform(0, d), self.kill)
            timer.daemon = True
            timer.start()

    def end(self) -> float:
        took = time.perf_counter() - self._start
        self.durations.append(took)
        if self.count == self.k:
            self.kill()
        return took

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` with :meth:`begin` before and :meth:`end` after each call."""
        def wrapped(*args, **kwargs):
            self.begin()
            try:
                return fn(*args, **kwargs)
            finally:
                self.end()
        return wrapped


# --------------------------------------------------------------------------- results
def io_write_bytes() -> int:
    """This process's ``write_bytes`` from ``/proc/self/io`` (0 where there is none)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


RESULT_FIELDS = ("stalls", "wall_s", "io_write_bytes", "resumed_from_step", "final_step", "final_weights",
                 "registered_model_uri", "checkpoint_files", "error", "notes")


def write_result(path: str, **fields: Any) -> str:
    """The runner's result JSON at ``path`` (missing fields null; ``stalls``, ``notes``,
    ``checkpoint_files`` empty lists), written atomically."""
    out = {k: None for k in RESULT_FIELDS}
    out.update(stalls=[], notes=[], checkpoint_files=[])
    out.update(fields)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


def read_spec(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- runners' common parts
def experiment_name(spec: dict[str, Any]) -> str:
    return f"peers-{spec['side']}-{spec['setup']}"


def ensure_experiment(spec: dict[str, Any]) -> str:
    """The MLflow experiment ``peers-<side>-<setup>`` at ``spec``'s tracking URI, created with its
    ``artifact_location`` when missing; its id. S3 artifacts reach ``s3_endpoint``."""
    import mlflow

    if spec.get("s3_endpoint"):
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", spec["s3_endpoint"])
        os.environ.setdefault("AWS_ENDPOINT_URL", spec["s3_endpoint"])
    mlflow.set_tracking_uri(spec["mlflow_tracking_uri"])
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment_name(spec))
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment_name(spec), artifact_location=spec["artifact_location"])


def model_folder(spec: dict[str, Any]) -> str:
    """The base model folder of the run: ``spec["model_folder"]`` when given, else built once
    under ``workdir`` (the same bytes every time)."""
    folder = spec.get("model_folder") or os.path.join(spec["workdir"], "base-model")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        build_model_folder(folder)
    return folder


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def pip_requirements() -> list[str]:
    """What the registered final model needs, pinned to this environment (passed to
    ``mlflow.transformers.log_model`` so it infers nothing)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors", "tokenizers")]


def run_peer(argv: list[str], train: Callable[[dict, str, dict], None], files: Callable[[dict], list[str]]) -> int:
    """A peer runner's ``main``: the spec from ``argv[1]``, the model folder built before the
    byte count starts (the same for every side), ``train(spec, folder, fields)`` filling the
    result's fields (an exception becomes its ``error``, in one line), then ``files(spec)``, the
    checkpoint files, the wall time since ``T0`` of the runner and the bytes written."""
    import traceback

    spec = read_spec(argv[1])
    folder = model_folder(spec)
    io0 = io_write_bytes()
    fields: dict = {"notes": []}
    try:
        train(spec, folder, fields)
    except Exception as e:  # noqa: BLE001 - the harness reads the error from the result
        traceback.print_exc()
        fields["error"] = one_line(e)
    fields["checkpoint_files"] = files(spec)
    fields.update(wall_s=time.perf_counter() - START, io_write_bytes=io_write_bytes() - io0)
    write_result(spec["result"], **fields)
    return 0


START = time.perf_counter()
"""When this module was first imported: a runner imports it first, so its wall time counts from here."""


def register(spec: dict[str, Any], model, tokenizer, run_id: str, notes: list[str]) -> str:
    """The lines a Lightning or HF Trainer user adds to register the final model: the same
    folder WMTP registers (head 0 as a Hugging Face causal LM, its tokenizer, the extra heads in
    ``mtp_heads.safetensors`` beside it) logged with MLflow's transformers flavor into the
    training run and registered as ``spec["register_name"]``; its ``models:/`` URI."""
    import tempfile

    import mlflow
    from safetensors.torch import save_file

    # --- user code: register the final model, its extra heads beside it ---
    with tempfile.TemporaryDirectory() as folder, mlflow.start_run(run_id=run_id):
        model.base.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in model.heads.state_dict().items()}, f"{folder}/mtp_heads.safetensors")
        info = mlflow.transformers.log_model(
            transformers_model=folder, name="model", task="text-generation",
            registered_model_name=spec["register_name"], pip_requirements=pip_requirements())
    # --- end of user code ---
    notes.append("registered: head 0 as a Hugging Face causal LM, the extra heads in mtp_heads.safetensors beside it")
    return f"models:/{spec['register_name']}/{info.registered_model_version}"
