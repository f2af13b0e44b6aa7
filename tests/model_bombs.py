"""Hostile Hugging Face model folders, made from a good tiny GPT-2 folder (:func:`hf_models.causal_lm`):
memory bombs (a ``config.json`` that declares far more than its weights hold, or than any machine
has), broken or disguised safetensors files, configs and tokenizers nested 10^5 deep, values of
the wrong type. Each case is a function that spoils a copy of the good folder, and the words the
refusal must hold (``{where}``: the folder as the user named it, a path or a ``models:/`` URI).

Shared by ``tests/test_hostile_models.py`` and the campaign (``benchmarks/hostile_models.py``)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

DEEP = 100_000
"""Nesting of the deep JSON cases: far past Python's recursion limit."""


def _config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def header_length(n: int) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        raw = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + raw[8:])
    return spoil


def nested_header(folder: Path) -> None:
    _, data = _split(folder / "model.safetensors")
    _join(folder / "model.safetensors", b"[" * DEEP + b"]" * DEEP, data)


def deep_object_header(folder: Path) -> None:
    _, data = _split(folder / "model.safetensors")
    _join(folder / "model.safetensors", b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}", data)


def offsets_past_the_end(folder: Path) -> None:
    header, data = _split(folder / "model.safetensors")
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start + 10**9, end + 10**9]
    _join(folder / "model.safetensors", header, data)


def truncated(folder: Path) -> None:
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) - 1000])


def torch_zip(folder: Path) -> None:
    """``torch.save`` of the weights (a zip of pickles) renamed ``model.safetensors``."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")  # memory-mapped: written elsewhere, then renamed
    torch.save(weights, folder / "model.pt")
    os.replace(folder / "model.pt", folder / "model.safetensors")


def deep_json(name: str) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        path = folder / name
        start = path.read_text().rstrip()[:-1] if path.exists() else "{"
        sep = ", " if start.strip() != "{" else ""
        path.write_text(start + sep + '"deep": ' + "[" * DEEP + "]" * DEEP + "}")
    return spoil


def config_values(**changes) -> Callable[[Path], None]:
    return lambda folder: _config(folder, **changes)


def vocab_bomb(folder: Path) -> None:
    """The report's case: ``vocab_size: 50000000`` and the embedding taken out of the weights, so
    that no shape disagrees: only the sizes tell."""
    header, data = _split(folder / "model.safetensors")
    entry = header.pop("transformer.wte.weight")
    start, end = entry["data_offsets"]
    for v in header.values():
        if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= end:
            v["data_offsets"] = [v["data_offsets"][0] - (end - start), v["data_offsets"][1] - (end - start)]
    _join(folder / "model.safetensors", header, data[:start] + data[end:])
    _config(folder, vocab_size=50_000_000)


def giant(folder: Path) -> None:
    """A consistent model of about 78 billion parameters (n_embd 8192, 96 layers): its weights
    file holds every tensor it declares, as a sparse file (no disk is used), and no machine here
    can train it (1.2 TB)."""
    d, layers, vocab, positions = 8192, 96, 50257, 1024
    shapes = {"transformer.wte.weight": [vocab, d], "transformer.wpe.weight": [positions, d],
              "transformer.ln_f.weight": [d], "transformer.ln_f.bias": [d]}
    for i in range(layers):
        p = f"transformer.h.{i}"
        shapes.update({f"{p}.ln_1.weight": [d], f"{p}.ln_1.bias": [d], f"{p}.attn.c_attn.weight": [d, 3 * d],
                       f"{p}.attn.c_attn.bias": [3 * d], f"{p}.attn.c_proj.weight": [d, d],
                       f"{p}.attn.c_proj.bias": [d], f"{p}.ln_2.weight": [d], f"{p}.ln_2.bias": [d],
                       f"{p}.mlp.c_fc.weight": [d, 4 * d], f"{p}.mlp.c_fc.bias": [4 * d],
                       f"{p}.mlp.c_proj.weight": [4 * d, d], f"{p}.mlp.c_proj.bias": [d]})
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    _config(folder, n_embd=d, n_layer=layers, n_head=64, n_positions=positions, vocab_size=vocab)


def heads_bomb(folder: Path) -> None:
    (folder / "mtp_heads.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


def index_escape(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"transformer.wte.weight": "../../../etc/x.safetensors"}}))


ST = "model.safetensors is not a safetensors file WMTP can read: "
CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    # memory bombs (issue 18, item 4)
    "vocab_size 50000000": (vocab_bomb, (
        "{where}/config.json says vocab_size 50000000: a model of 1,600,",
        "(transformer.wte.weight [50000000, 32] is not among them)",
        "Accepted: a config.json that describes the weights beside it (training the model it describes would "
        "need ", "of memory available)")),
    "n_layer 1000000": (config_values(n_layer=1_000_000), (
        "{where}/config.json says n_layer: 1000000; accepted: an integer from 0 to 1024; its weights (model.safetensors) "
        "hold ", "2 layers, transformer.h.0 to transformer.h.1); this machine has ")),
    "n_layer 1000": (config_values(n_layer=1000), (
        "{where}/config.json says n_layer 1000: a model of ", "2 layers, transformer.h.0 to transformer.h.1)")),
    "n_embd 65536": (config_values(n_embd=65536), (
        "{where}/config.json says n_embd 65536, but transformer.h.", "in the model it describes and")),
    "78B parameters": (giant, (
        "{where} is a model of 7", " parameters; training it needs ",
        "(float32 weights, their gradients and Adam's two moments: 16 bytes a parameter), but this machine has ")),
    # hostile folders (item 6)
    "header length 2^40": (header_length(1 << 40), (
        "{where}/" + ST + "its header length is 1,099,511,627,776 bytes, over safetensors' limit",)),
    "header length 2^64-1": (header_length((1 << 64) - 1), (
        "{where}/" + ST + "its header length is 18,446,744,073,709,551,615 bytes",)),
    "header [[[...]]]": (nested_header, ("{where}/" + ST + "its header is not a JSON object",)),
    "header nested 10^5 deep": (deep_object_header, ("{where}/" + ST + "its header is not JSON (RecursionError)",)),
    "offsets past the end": (offsets_past_the_end, ("{where}/" + ST + "tensor ", "past its end (the file holds")),
    "truncated weights": (truncated, ("{where}/" + ST + "tensor ", "past its end")),
    "torch zip renamed": (torch_zip, ("{where}/" + ST + "it is a zip archive (what torch.save writes",)),
    "config.json 10^5 deep": (deep_json("config.json"), (
        "{where}/config.json nests deeper than 64 levels; accepted: a config.json of at most 64 levels",)),
    "tokenizer.json 10^5 deep": (deep_json("tokenizer.json"), (
        "{where}/tokenizer.json nests deeper than 64 levels; accepted: a tokenizer file of at most 64 levels",)),
    "generation_config.json 10^5 deep": (deep_json("generation_config.json"), (
        "{where}/generation_config.json nests deeper than 64 levels",)),
    "model_type evil": (config_values(model_type="evil"), (
        '{where}/config.json says model_type: "evil"; accepted: a model type transformers ',)),
    "vocab_size -5": (config_values(vocab_size=-5), (
        "{where}/config.json says vocab_size: -5; accepted: a positive integer",)),
    'vocab_size "300"': (config_values(vocab_size="300"), (
        '{where}/config.json says vocab_size: "300"; accepted: a positive integer',)),
    "architectures 5": (config_values(architectures=5), (
        "{where}/config.json says architectures: 5; accepted: a list of class names",)),
    "n_future_tokens 10^9": (config_values(mtp_config={"n_future_tokens": 10**9}), (
        "{where}/config.json says mtp_config.n_future_tokens: 1000000000; accepted: an integer from 1 to 256",)),
    "mtp_heads header 2^40": (heads_bomb, (
        "{where}/mtp_heads.safetensors is not a safetensors file WMTP can read: its header length",)),
    "index naming ../": (index_escape, (
        "{where}/model.safetensors.index.json names '../../../etc/x.safetensors', which is not a safetensors "
        "file of the folder",)),
}
"""name -> (what spoils a good folder, the words its refusal holds)."""
BOMBS = ("vocab_size 50000000", "n_layer 1000000", "n_layer 1000", "n_embd 65536", "78B parameters")
SPARSE = ("78B parameters",)
"""Cases whose weights are a sparse file: never copied into a registry (it would write them out)."""


def good_folder(target: Path) -> Path:
    """The tiny GPT-2 every case spoils (its real tokenizer files, a generation config)."""
    from hf_models import causal_lm

    causal_lm(target)
    if not (target / "generation_config.json").exists():
        (target / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}))
    return target


def make(case: str, good: Path, target: Path) -> Path:
    """A copy of ``good`` at ``target``, spoilt as ``case`` says."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(good, target)
    os.chmod(target, 0o755)
    CASES[case][0](target)
    return target


def expected(case: str, where: str) -> tuple[str, ...]:
    return tuple(w.replace("{where}", where) for w in CASES[case][1])
