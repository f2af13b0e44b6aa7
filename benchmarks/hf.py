"""Hugging Face benchmarks: a GPT-2 small sized model (random weights, built offline from its config)
with WMTP's multi-token heads, its resume state and its final model as a Hugging Face folder,
through the local sink against plain torch / transformers, measured in one run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gc  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from storage import _event, _row, _scratch, _sink, bare_save  # noqa: E402
from wmtp_core import Payload, Role, RunInfo, SinkContext  # noqa: E402
from wmtp_core.events import CheckpointEmitted  # noqa: E402
from wmtp_plugins.local import LocalSink  # noqa: E402

N_FUTURE = 4
TOKENIZER_SOURCE = Path("/work/shared/origin-files/tests/test_models/distilgpt2-mtp")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def build(root: Path):
    """GPT-2 small (random weights) with ``N_FUTURE - 1`` extra linear heads, an AdamW after one
    step (so ``exp_avg`` and ``exp_avg_sq`` exist), and the GPT-2 tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from wmtp_core.engine import hf as whf

    whf._quiet()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257))
    model = whf.HFMTPModel(base, n_future=N_FUTURE, head="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, 50257, (1, 8))).float().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    for f in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SOURCE / f, tok_dir / f)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return model, opt, tokenizer


def resume_state(model, opt) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "trainer": {"step": 1, "losses": [3.0], "rng": torch.get_rng_state()}}


def _tensor_mb(obj) -> float:
    from storage import _tensors

    seen = {}
    for _, t in _tensors(obj):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 1e6


def _label(model) -> str:
    base = _n_params(model.base)
    return (f"GPT-2 small + {N_FUTURE - 1} heads ({_n_params(model):,} params; base {base:,})")


def _timed(fn) -> float:
    """Time ``fn``, starting from a clean disk queue: a side that does not fsync leaves dirty
    pages whose writeback would otherwise land on whichever side runs next."""
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _runs(row: dict, ours: list[float], plain: list[float]) -> dict:
    """Every repetition, not only the medians (three are few on a shared disk)."""
    row["wmtp_runs"], row["plain_runs"] = [round(v, 4) for v in ours], [round(v, 4) for v in plain]
    return row


def _order(sides: list[str], i: int) -> list[str]:
    """Rotate which side goes first, so none always runs on a warmer disk."""
    k = i % len(sides)
    return sides[k:] + sides[:k]


# --- 1. resume state: save ----------------------------------------------------------------------
def bench_resume_save(model, opt, root: Path, repeat: int) -> list[dict]:
    state = resume_state(model, opt)
    mb = _tensor_mb(state)
    sink = _sink(root / "sink", "hf-save")
    t = {"ours": [], "plain": []}
    for i in range(repeat):
        for side in _order(["ours", "plain"], i):
            if side == "ours":
                t[side].append(_timed(lambda: sink.store(event=_event(sink, i), payload=Payload(parts=state))))
            else:
                t[side].append(_timed(lambda: bare_save(state, root / f"bare_{i}.pt")))
        shutil.rmtree(root / "sink" / "hf-save" / f"step_{i}")
        (root / f"bare_{i}.pt").unlink()
        gc.collect()
    return [_runs(_row(f"HF resume save, {_label(model)}, {mb:.0f} MB: local sink vs torch.save+fsync",
                       statistics.median(t["ours"]), statistics.median(t["plain"]), 1.10), t["ours"], t["plain"])]


# --- 2. resume state: verified restore ------------------------------------------------------------
def _own(opt) -> None:
    """Write every optimizer moment once in place, as the first optimizer step after a resume
    does. ``optimizer.load_state_dict`` keeps the loaded tensors as they are: a memory-mapped
    load would otherwise pay its copy-on-write page faults after the clock stopped."""
    for st in opt.state.values():
        for k, v in st.items():
            if k != "step" and isinstance(v, torch.Tensor):
                v.mul_(1)


def bench_resume_restore(model, opt, root: Path, repeat: int) -> list[dict]:
    """Two clocks per side in one pass: when ``load_state_dict`` returns, and when the optimizer
    state has been written once in place (see :func:`_own`)."""
    state = resume_state(model, opt)
    mb = _tensor_mb(state)
    sink = _sink(root / "sink", "hf-restore")
    receipt = sink.store(event=_event(sink, 1), payload=Payload(parts=state))
    bare_save(state, root / "bare.pt")
    del state
    loaded = {"ours": [], "plain": []}
    owned = {"ours": [], "plain": []}

    def load(side):
        if side == "ours":
            return sink.load(receipt.uri).parts  # manifest, every file's BLAKE3, weights-only (mmap)
        return torch.load(root / "bare.pt", map_location="cpu", weights_only=True)

    for i in range(repeat):
        for side in _order(["ours", "plain"], i):
            os.sync()
            t0 = time.perf_counter()
            parts = load(side)
            model.load_state_dict(parts["model"])
            opt.load_state_dict(parts["optimizer"])
            loaded[side].append(time.perf_counter() - t0)
            _own(opt)
            owned[side].append(time.perf_counter() - t0)
            del parts
            gc.collect()
    shutil.rmtree(root / "sink")
    (root / "bare.pt").unlink()
    name = f"HF resume restore, {_label(model)}, {mb:.0f} MB: verified load vs torch.load"
    return [
        _runs(_row(f"{name}, then load_state_dict (model, optimizer)", statistics.median(loaded["ours"]),
                   statistics.median(loaded["plain"]), 1.15), loaded["ours"], loaded["plain"]),
        _runs(_row(f"{name}, then load_state_dict and one in-place write of the optimizer moments "
                   "(the first step's; counts the deferred cost of a memory-mapped load)",
                   statistics.median(owned["ours"]), statistics.median(owned["plain"]), 1.15),
              owned["ours"], owned["plain"]),
    ]


# --- 3. final model: save -------------------------------------------------------------------------
def _final_sink(base: Path, run: str) -> LocalSink:
    info = RunInfo(name=run, algo="baseline-mtp", lineage="bench")
    return LocalSink(SinkContext(role=Role.FINAL, run=info, base_path=f"file://{base}"))


def _final_event(sink, step):
    return CheckpointEmitted(run=sink.context.run, role=Role.FINAL, step=step, parts=("model",), nbytes=0)


def _heads(model) -> dict:
    return {f"heads.{k}": v.detach().to("cpu").contiguous() for k, v in model.heads.state_dict().items()}


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.iterdir()):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_hf_save(model, tokenizer, folder: Path, heads: bool, fsync: bool) -> None:
    from safetensors.torch import save_file

    from wmtp_core.engine.hf import HEADS

    model.base.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if heads:
        save_file(_heads(model), os.path.join(folder, HEADS))
    if fsync:
        _fsync_tree(folder)


def bench_final_save(model, tokenizer, root: Path, repeat: int) -> list[dict]:
    from wmtp_core.engine import hf as whf

    sink = _final_sink(root / "sink", "hf-final")
    final = root / "sink" / "hf-final" / "final"
    weights = model.state_dict()
    sides = ["ours", "hf", "bytes", "durable"]
    t = {s: [] for s in sides}
    sizes = {}

    def ours():
        folder = whf.export(model, tokenizer, tempfile.mkdtemp(prefix="wmtp-final-", dir=root),
                            {"algo": "baseline-mtp", "base_model": "gpt2-random", "step": 1})
        sink.store(event=_final_event(sink, 1), payload=Payload(parts={"model": weights}, folder=folder))
        shutil.rmtree(folder, ignore_errors=True)  # what the run does once it is stored

    for i in range(repeat):
        for side in _order(sides, i):
            if side == "ours":
                t[side].append(_timed(ours))
            else:
                d = root / f"plain_{side}"
                t[side].append(_timed(lambda: plain_hf_save(model, tokenizer, d, heads=side != "hf",
                                                            fsync=side == "durable")))
        sizes = {"ours": sum(p.stat().st_size for p in final.iterdir()),
                 **{s: sum(p.stat().st_size for p in (root / f"plain_{s}").iterdir()) for s in sides[1:]}}
        shutil.rmtree(final)
        for s in sides[1:]:
            shutil.rmtree(root / f"plain_{s}")
        gc.collect()
    ours_t = statistics.median(t["ours"])
    mb = {k: v / 1e6 for k, v in sizes.items()}
    label = f"HF final save, {_label(model)}: export + local sink ({mb['ours']:.0f} MB)"
    return [
        _runs(_row(f"{label} vs save_pretrained+tokenizer, no fsync (for scale: no target; head 0 only, "
                   f"{mb['hf']:.0f} MB, nothing durable: not like-for-like)", ours_t, statistics.median(t["hf"]),
                   None), t["ours"], t["hf"]),
        _runs(_row(f"{label} vs save_pretrained+tokenizer+save_file(heads), no fsync (for scale: no target; "
                   f"same bytes, {mb['bytes']:.0f} MB, nothing durable)", ours_t, statistics.median(t["bytes"]),
                   None), t["ours"], t["bytes"]),
        _runs(_row(f"{label} vs save_pretrained+tokenizer+save_file(heads)+fsync (same bytes and "
                   "durability: like-for-like)", ours_t, statistics.median(t["durable"]), 1.10),
              t["ours"], t["durable"]),
    ]


# --- 4. final model: verified restore -------------------------------------------------------------
def plain_hf_load(folder: str):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from wmtp_core.engine.hf import HEADS, HFMTPModel

    base = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                dtype=torch.float32)
    model = HFMTPModel(base, N_FUTURE, "linear")
    heads = load_file(os.path.join(folder, HEADS))
    model.heads.load_state_dict({k.removeprefix("heads."): v for k, v in heads.items()})
    return model


def bench_final_restore(model, tokenizer, root: Path, repeat: int) -> list[dict]:
    from wmtp_core.checkpoint_models import load_model_from_checkpoint
    from wmtp_core.engine import hf as whf

    sink = _final_sink(root / "sink", "hf-final-restore")
    folder = whf.export(model, tokenizer, tempfile.mkdtemp(prefix="wmtp-final-", dir=root), {"step": 1})
    receipt = sink.store(event=_final_event(sink, 1), payload=Payload(parts={"model": {}}, folder=folder))
    shutil.rmtree(folder)
    plain_dir = root / "plain_final"
    plain_hf_save(model, tokenizer, plain_dir, heads=True, fsync=True)
    t = {"ours": [], "plain": []}

    def ours():
        loaded = load_model_from_checkpoint(receipt.uri)  # manifest, then every file's BLAKE3
        info = whf.inspect(loaded.folder, "bench")
        m, heads_loaded = whf.build_mtp(info, loaded.folder, N_FUTURE, "linear", "bench")
        assert heads_loaded

    for i in range(repeat):
        for side in _order(["ours", "plain"], i):
            t[side].append(_timed(ours if side == "ours" else lambda: plain_hf_load(str(plain_dir))))
            gc.collect()
    shutil.rmtree(root / "sink")
    shutil.rmtree(plain_dir)
    return [_runs(_row(f"HF final restore, {_label(model)}: verify + from_pretrained + heads vs "
                       "from_pretrained + heads",
                       statistics.median(t["ours"]), statistics.median(t["plain"]), 1.15), t["ours"], t["plain"])]


def bench_hf(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    """All four, on one model. ``size_mb`` does not apply (the model fixes the size); at most
    three repetitions, since every save is hundreds of MB."""
    repeat = max(1, min(repeat, 3))
    root = _scratch(workdir)
    try:
        model, opt, tokenizer = build(root)
        print(f"   {_label(model)}; resume state {_tensor_mb(resume_state(model, opt)):.0f} MB, "
              f"{repeat} repetitions", flush=True)
        rows = []
        for name, fn in (("resume save", lambda: bench_resume_save(model, opt, root, repeat)),
                         ("resume restore", lambda: bench_resume_restore(model, opt, root, repeat)),
                         ("final save", lambda: bench_final_save(model, tokenizer, root, repeat)),
                         ("final restore", lambda: bench_final_restore(model, tokenizer, root, repeat))):
            print(f"   {name}", flush=True)
            rows += fn()
            gc.collect()
        for r in rows:
            r["params"] = _n_params(model)
            r["repeat"] = repeat
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


MBPP = Path(__file__).resolve().parents[2] / "shared" / "origin-files" / "datasets" / "mbpp"
"""The full MBPP splits (374 training problems), beside the project's root."""


def bench_padding(size_mb: int, repeat: int, workdir=None, steps: int = 8) -> list[dict]:
    """Training steps on MBPP's training split, unpacked (``pack_sequences: false``, ``max_length``
    512, batch 4), each batch padded to its longest row (what the engine does) against the same
    batches padded to ``max_length`` (what it did), in one run, sides alternating. A GPT-2 of 2
    layers, 256 wide, with 4 heads: the padding is what differs. ``size_mb`` does not apply."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from wmtp_core.engine import corpus
    from wmtp_core.engine import data as data_mod
    from wmtp_core.engine import hf as whf
    from wmtp_core.engine.algorithms import BaselineMTP

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_SOURCE, local_files_only=True)
    docs = corpus.documents(str(MBPP), "train", "paths.datasets.mbpp")
    rows = data_mod.windows(data_mod.encode(docs, tokenizer, tokenizer.eos_token_id), 512, False,
                            tokenizer.eos_token_id)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=256, n_head=4, n_positions=512))
    model = whf.HFMTPModel(base, N_FUTURE, "linear")
    algo = BaselineMTP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    batches = [order[i:i + 4] for i in range(0, 4 * steps, 4)]

    def train(pad_to_longest: bool) -> float:
        started = time.perf_counter()
        for idx in batches:
            lengths = rows.lengths[idx] if rows.lengths is not None else None
            ids, lengths = data_mod.trimmed(rows.ids[idx], lengths) if pad_to_longest else (rows.ids[idx].long(), lengths)
            loss, _ = algo.loss(model, ids, lengths)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - started) / len(batches)

    train(True)  # warm-up
    times: dict[str, list[float]] = {"longest": [], "max_length": []}
    for i in range(max(1, repeat)):
        for side in _order(["longest", "max_length"], i):
            times[side].append(train(side == "longest"))
    longest, padded = statistics.median(times["longest"]), statistics.median(times["max_length"])
    mean_len = float(rows.lengths.float().mean()) if rows.lengths is not None else 512.0
    row = _row(f"HF training step on MBPP train ({len(rows)} rows, mean {mean_len:.0f} of 512 tokens, batch 4, "
               f"{_label(model)}): padded to the batch's longest row vs to max_length; "
               f"{1 / longest:.2f} vs {1 / padded:.2f} steps/s", longest, padded, 0.5)
    return [_runs(row, times["longest"], times["max_length"])]
