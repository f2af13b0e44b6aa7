"""The data layer on the code datasets WMTP trains on: splits kept apart, records turned into
documents, token ids from real tokenizers, windows, and a batch stream that resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_core.engine import data
from wmtp_core.errors import DataError

SAMPLES = Path("/work/shared/origin-files/tests/test_dataset")
GPT2 = Path("/work/shared/origin-files/tests/test_models/distilgpt2-mtp")
GPT2_EOS = 50256

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="dataset samples not present")


def records(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def url(name: str) -> str:
    return f"file://{SAMPLES / name}"


# -- splits ------------------------------------------------------------------------------------

@needs_samples
def test_mbpp_splits_are_kept_apart():
    mbpp = SAMPLES / "mbpp"
    train = data.documents(url("mbpp"), "train", "paths.datasets.mbpp")
    assert len(train) == 10
    for rec, doc in zip(records(mbpp / "train.jsonl"), train):
        assert rec["text"] in doc and rec["code"] in doc
        assert doc == rec["text"] + "\n" + rec["code"]
    others = [*records(mbpp / "validation.jsonl"), *records(mbpp / "test.jsonl")]
    assert not any(rec["code"] in doc for rec in others for doc in train)

    evals = data.documents(url("mbpp"), "eval", "paths.datasets.mbpp")
    assert evals == [r["text"] + "\n" + r["code"] for r in records(mbpp / "validation.jsonl")]
    test = data.documents(url("mbpp"), "test", "paths.datasets.mbpp")
    assert test == [r["text"] + "\n" + r["code"] for r in records(mbpp / "test.jsonl")]
    mini = data.documents(url("mbpp"), "train_mini", "paths.datasets.mbpp")
    assert mini == [r["text"] + "\n" + r["code"] for r in records(mbpp / "train_mini.jsonl")]
    # a named split is its file alone
    _, files = data.source_files(url("mbpp"), "test_mini", "paths.datasets.mbpp")
    assert [Path(f).name for f in files] == ["test_mini.jsonl"]


def test_split_of_and_sources():
    assert data.split_of("/d/train.jsonl") == "train"
    assert data.split_of("s3://b/mbpp/train_mini.jsonl") == "train_mini"
    assert data.split_of("validation.json") == "validation"
    assert data.parse_source("mbpp", "train") == ("mbpp", "train")
    assert data.parse_source("mbpp:test", "eval") == ("mbpp", "test")


@needs_samples
def test_humaneval_eval_falls_back_to_test_and_train_is_refused():
    docs = data.documents(url("humaneval"), "eval", "paths.datasets.humaneval")
    recs = records(SAMPLES / "humaneval" / "test.json")
    assert len(docs) == 10
    for rec, doc in zip(recs, docs):
        assert doc.startswith(rec["prompt"]) and doc.endswith(rec["canonical_solution"])
        sep = "" if rec["prompt"].endswith("\n") else "\n"
        assert doc == rec["prompt"] + sep + rec["canonical_solution"]
    with pytest.raises(DataError) as e:
        data.documents(url("humaneval"), "train", "paths.datasets.humaneval")
    msg = str(e.value)
    assert msg.startswith(f"paths.datasets.humaneval: {url('humaneval')!r} has no train split")
    assert "(splits there: test)" in msg and "'humaneval:test'" in msg


def test_eval_prefers_validation_names_over_test(tmp_path):
    for name in ("train", "dev", "test"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": name}) + "\n")
    assert data.documents(str(tmp_path), "eval", "k") == ["dev"]
    assert data.documents(str(tmp_path), "train", "k") == ["train"]
    assert data.documents(f"{tmp_path}/*.jsonl", "test", "k") == ["test"]


def test_files_without_split_names_serve_every_split(tmp_path):
    (tmp_path / "a.py").write_text("print('a')\n")
    (tmp_path / "b.txt").write_text("bee")
    for split in ("train", "eval", "test"):
        assert data.documents(str(tmp_path), split, "k") == ["print('a')\n", "bee"]
    # a single file, even one named like a split, is read whole for any split
    one = tmp_path / "sub" / "test.jsonl"
    one.parent.mkdir()
    one.write_text('{"text": "t"}\n\n{"text": "u"}\n')
    assert data.documents(f"file://{one}", "train", "k") == ["t", "u"]


def test_max_bytes_stops_reading(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "x" * 10}) + "\n" for _ in range(10)))
    assert len(data.documents(str(tmp_path), "train", "k", max_bytes=25)) == 3


# -- record shapes -----------------------------------------------------------------------------

@needs_samples
def test_codecontests_arrays_each_split():
    for split, file in (("train", "train.json"), ("eval", "validation.json"), ("test", "test.json")):
        recs = records(SAMPLES / "contest" / file)
        docs = data.documents(url("contest"), split, "paths.datasets.contest")
        assert len(docs) == len(recs)
        # the samples carry no solution: the description alone
        assert docs == [r["description"] for r in recs]


def test_codecontests_first_solution_in_every_shape(tmp_path):
    recs = [
        {"name": "hf", "description": "Add two numbers.\n",
         "solutions": {"language": [3, 2], "solution": ["print(sum(map(int, input().split())))", "int main(){}"]}},
        {"name": "list", "description": "Say hi.", "solutions": ["", "print('hi')", "print('hello')"]},
        {"name": "dicts", "description": "Echo.", "solutions": [{"language": "python", "solution": "print(input())"}]},
        {"name": "encoded", "description": "Nothing.", "solutions": json.dumps(["pass", "x"])},
        {"name": "empty", "description": "Empty.", "solutions": "[]"},
        {"name": "none", "description": "None."},
    ]
    (tmp_path / "train.json").write_text(json.dumps(recs, indent=2))
    assert data.documents(str(tmp_path), "train", "k") == [
        "Add two numbers.\nprint(sum(map(int, input().split())))",
        "Say hi.\nprint('hi')",
        "Echo.\nprint(input())",
        "Nothing.\npass",
        "Empty.",
        "None.",
    ]


def test_document_format_directly():
    assert data.document_of({"text": "t", "code": "c", "test_list": []}, "w") == "t\nc"
    assert data.document_of({"prompt": "p\n", "canonical_solution": "s"}, "w") == "p\ns"
    assert data.document_of({"prompt": "p", "canonical_solution": ""}, "w") == "p"
    assert data.document_of({"text": "plain"}, "w") == "plain"


def test_bad_records_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"foo": 1}\n')
    with pytest.raises(DataError) as e:
        data.documents(f"file://{bad}", "train", "paths.datasets.bad")
    msg = str(e.value)
    assert msg.startswith(f"paths.datasets.bad: {bad} line 3 is not a JSON object with a 'text' string field")
    assert "'prompt' and 'canonical_solution' (HumanEval)" in msg and "'description' (CodeContests)" in msg

    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": "ok"}, {"foo": 1}]))
    with pytest.raises(DataError, match=r"arr\.json record 2 is not a JSON object with a 'text'"):
        data.documents(str(arr), "train", "k")

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl line 2 is not valid JSON"):
        data.documents(str(broken), "train", "k")
    broken_arr = tmp_path / "broken.json"
    broken_arr.write_text('[\n  {"text": "ok"},\n  {"text" "no colon"}\n]')
    with pytest.raises(DataError, match=r"broken\.json line 3 is not valid JSON"):
        data.documents(str(broken_arr), "train", "k")

    wrong_type = tmp_path / "wt.jsonl"
    wrong_type.write_text('{"text": "t", "code": 5}\n')
    with pytest.raises(DataError, match=r"wt\.jsonl line 1: field 'code' is int 5, not a string"):
        data.documents(str(wrong_type), "train", "k")


def test_missing_and_empty_locations(tmp_path):
    with pytest.raises(DataError, match=r"paths\.datasets\.x: 'file:///nowhere/c\.jsonl' does not exist"):
        data.documents("file:///nowhere/c.jsonl", "train", "paths.datasets.x")
    with pytest.raises(DataError, match="holds no data files"):
        data.documents(str(tmp_path), "train", "k")


# -- tokenizing --------------------------------------------------------------------------------

@pytest.fixture
def gpt2(tmp_path, monkeypatch):
    if not GPT2.is_dir():
        pytest.skip("GPT-2 tokenizer files not present")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "special_tokens_map.json"):
        shutil.copy(GPT2 / name, folder / name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@needs_samples
def test_gpt2_encode_appends_eos_and_round_trips(gpt2):
    docs = data.documents(url("humaneval"), "eval", "paths.datasets.humaneval")
    ids = data.encode(docs, gpt2, GPT2_EOS)
    assert len(ids) == len(docs)
    for doc, row in zip(docs, ids):
        assert row[-1] == GPT2_EOS and GPT2_EOS not in row[:-1]
        assert gpt2.decode(row[:-1], clean_up_tokenization_spaces=False) == doc
    no_eos = data.encode(docs[:2], gpt2, None)
    assert no_eos == [r[:-1] for r in ids[:2]]
    w = data.windows(ids, 64, pack=True)
    assert w.ids.dtype == torch.int32 and w.lengths is None
    assert w.ids.flatten().tolist() == [t for r in ids for t in r][: len(w) * 64]


def test_byte_tokenizer_encode():
    assert data.encode(["hé", ""], data.ByteTokenizer(), None) == [[104, 195, 169], []]
    assert data.encode(["a"], data.ByteTokenizer(), 0) == [[97, 0]]
    docs = data.stdlib_documents(max_bytes=1)
    assert len(docs) == 1 and isinstance(docs[0], str)


# -- windows -----------------------------------------------------------------------------------

def test_windows_pack_and_pad_exactly():
    docs = [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10]]
    packed = data.windows(docs, 3, pack=True)
    assert packed.ids.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert packed.ids.dtype == torch.uint8 and packed.lengths is None and len(packed) == 3

    rows = data.windows(docs, 3, pack=False, pad_id=99)
    assert rows.ids.tolist() == [[1, 2, 3], [4, 5, 99], [7, 8, 9]]  # [6] and [10]: one token, dropped
    assert rows.lengths.tolist() == [3, 2, 3] and rows.lengths.dtype == torch.int64

    full = data.windows([[1, 2, 3, 4], [5, 6]], 2, pack=False)
    assert full.ids.tolist() == [[1, 2], [3, 4], [5, 6]] and full.lengths is None

    wide = data.windows([[300, 1, 2]], 2, pack=False)
    assert wide.ids.dtype == torch.int32 and wide.ids.tolist() == [[300, 1]]
    # a pad id beyond a byte widens the rows only when a row is padded
    unpadded = data.windows([[1, 2, 3, 4, 5]], 4, pack=False, pad_id=50256)
    assert unpadded.ids.dtype == torch.uint8 and unpadded.ids.tolist() == [[1, 2, 3, 4]]
    padded = data.windows([[1, 2, 3, 4, 5, 6]], 4, pack=False, pad_id=50256)
    assert padded.ids.tolist() == [[1, 2, 3, 4], [5, 6, 50256, 50256]] and padded.ids.dtype == torch.int32
    assert padded.lengths.tolist() == [4, 2]

    empty = data.windows([[1], []], 4, pack=False)
    assert empty.ids.shape == (0, 4) and len(empty) == 0


def test_split_tail_and_slicing():
    w = data.windows([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], 3, pack=False)
    assert w.ids.tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 8], [9, 10, 0]]
    head, tail = data.split_tail(w, 1)
    assert head.ids.tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 8]] and head.lengths.tolist() == [3, 2, 3]
    assert tail.ids.tolist() == [[9, 10, 0]] and tail.lengths.tolist() == [2]
    first, rest = data.split_tail(w, 3)
    assert first.ids.tolist() == [[1, 2, 3]] and first.lengths is None  # no padded row left
    assert len(rest) == 3
    everything, none = data.split_tail(w, 0)
    assert len(everything) == 4 and len(none) == 0


# -- batches -----------------------------------------------------------------------------------

def test_batch_stream_resumes_bit_exactly():
    docs = [list(range(i, i + 5 + i % 7)) for i in range(40)]
    w = data.windows(docs, 4, pack=False, pad_id=255)
    assert w.lengths is not None
    a = data.BatchStream(w, 3, seed=7)
    for _ in range(a.batches_per_epoch + 2):  # past an epoch boundary
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(2 * a.batches_per_epoch)]
    b = data.BatchStream(w, 3, seed=7)
    b.load_state_dict(state)
    got = [b.next() for _ in range(len(expected))]
    for (ei, el), (gi, gl) in zip(expected, got):
        assert gi.dtype == torch.int64 and gi.shape == (3, int(gl.max())) and gl.dtype == torch.int64
        assert torch.equal(ei, gi) and torch.equal(el, gl)
    with pytest.raises(DataError, match="data seed"):
        data.BatchStream(w, 3, seed=8).load_state_dict(state)


def test_a_batch_is_padded_to_its_longest_row_not_to_max_length():
    docs = [list(range(1, 41)), list(range(1, 13)), list(range(1, 7)), list(range(1, 200))]
    w = data.windows(docs, 128, pack=False, pad_id=0)
    assert w.length == 128 and w.lengths.tolist() == [40, 12, 6, 128, 71]
    stream = data.BatchStream(w[:3], 3, seed=0)
    ids, lengths = stream.next()
    assert ids.shape == (3, 40) and sorted(lengths.tolist()) == [6, 12, 40]
    for row, n in zip(ids, lengths):  # real tokens kept, the rest is padding
        assert row[:n].tolist() == list(range(1, n + 1)) and not row[n:].any()
    (short, ls), = data.eval_batches(w[1:3], 2)
    assert short.shape == (2, 12) and ls.tolist() == [12, 6]
    (full, lf), = data.eval_batches(w[3:5], 2)
    assert full.shape == (2, 128) and lf.tolist() == [128, 71]


def test_batch_stream_refuses_too_few_windows_and_eval_batches():
    w = data.windows([[1, 2, 3, 4]], 2, pack=True)
    with pytest.raises(DataError, match=r"data\.train\.batch_size: 3 is larger than the 2 windows"):
        data.BatchStream(w, 3, seed=0)
    ids, lengths = data.BatchStream(w, 2, seed=0).next()
    assert lengths is None and sorted(ids.tolist()) == [[1, 2], [3, 4]]
    w = data.windows([list(range(10))] * 5, 4, pack=False)
    batches = data.eval_batches(w, 4, max_batches=2)
    assert len(batches) == 2 and torch.equal(batches[0][0], w.ids[:4].long())
    assert batches[1][1].tolist() == w.lengths[4:8].tolist()


@settings(max_examples=150, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 70000), max_size=30), max_size=12),
       length=st.integers(2, 9), pack=st.booleans(), pad_id=st.integers(0, 5))
def test_every_real_token_appears_in_order(docs, length, pack, pad_id):
    w = data.windows(docs, length, pack, pad_id=pad_id)
    flat = [t for d in docs for t in d]
    assert w.ids.shape == (len(w), length)
    big = any(t >= 256 for t in w.ids.flatten().tolist())
    assert w.ids.dtype == (torch.int32 if big else torch.uint8)
    if pack:
        assert w.lengths is None
        assert len(w) == len(flat) // length
        assert w.ids.flatten().tolist() == flat[: len(w) * length]
        return
    lengths = [length] * len(w) if w.lengths is None else w.lengths.tolist()
    assert all(2 <= n <= length for n in lengths)
    if w.lengths is not None:
        assert any(n < length for n in lengths)
    rows = w.ids.tolist()
    real = [t for row, n in zip(rows, lengths) for t in row[:n]]
    assert all(t == pad_id for row, n in zip(rows, lengths) for t in row[n:])
    # each document, less a one-token tail, in order
    expected = [t for d in docs for t in (d[: len(d) - 1] if len(d) % length == 1 else d)]
    assert real == expected
