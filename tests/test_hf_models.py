"""Fine-tuning pretrained Hugging Face models: the origin's model folders (its real tokenizers,
tiny random weights made here), its MBPP sample, every algorithm, the final model as a Hugging
Face folder and as an MLflow transformers model, bit-exact resume, two FSDP ranks."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import zygote
from builders import write
from conftest import KILLER
from hf_models import ORIGIN_DATA, causal_lm, origin_models

pytestmark = pytest.mark.slow
MBPP = str(ORIGIN_DATA / "mbpp")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """The origin's four model folders, with weights."""
    return origin_models(tmp_path_factory.mktemp("zoo"))


def config(tmp: Path, zoo: Path, **over) -> dict:
    data = {
        "seed": 5,
        "log_interval": 2,
        "paths": {
            "models": {"base": str(zoo / "distilgpt2-mtp"), "ref": str(zoo / "distilgpt2"),
                       "rm": str(zoo / "tiny-reward-model")},
            "datasets": {"mbpp": MBPP},
            "checkpoints": {"base_path": f"file://{tmp}/ck", "save_interval": 4, "keep_last": 3},
        },
        "mlflow": {"experiment": "hf", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
    }
    for key, value in over.items():
        data[key] = value
    return data


def recipe(algo: str = "baseline-mtp", mode: str = "weighted", steps: int = 8, **over) -> dict:
    data = {
        "run": {"name": "hf"},
        "train": {"algo": algo, "max_steps": steps, "num_epochs": 4},
        "optim": {"lr": 0.002, "scheduler": "constant", "warmup_ratio": 0.0},
        "data": {"train": {"sources": ["mbpp"], "max_length": 64, "batch_size": 2, "pack_sequences": False},
                 "eval": {"sources": ["mbpp"], "max_length": 64, "batch_size": 2, "pack_sequences": False}},
        "rho1": {"selection_mode": mode, "skip_threshold_percentile": 0.3, "min_ce_diff": 0.0},
        "loss": {"weight_norm": "mean1.0_clip", "max_weight": 3.0, "weight_temperature": 0.7},
        "critic": {"use_pseudo_rewards": False, "normalize": "zscore", "token_spread": "gae"},
        "pretrain": {"enabled": True, "max_steps": 2},
    }
    data.update(over)
    return data


def run(tmp: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from wmtp_core.run import main

    monkeypatch.chdir(tmp)
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def trainer_state(tmp: Path, run_name: str, step: int) -> dict:
    return torch.load(tmp / "ck" / run_name / f"step_{step}" / "trainer.pt", weights_only=True)


def trained_model(tmp: Path, run_name: str, step: int):
    """The model of a committed resume checkpoint, rebuilt as the run had it."""
    from wmtp_core.engine.models import rebuild

    weights = torch.load(tmp / "ck" / run_name / f"step_{step}" / "model.pt", weights_only=True)
    return rebuild(trainer_state(tmp, run_name, step)["model_config"], weights, "test").eval()


IDS = torch.tensor([[4299, 751, 7, 64, 11, 275, 2599, 198, 220, 220, 220, 1441]])
"""``def add(a, b):\\n    return`` in GPT-2 tokens."""


# ------------------------------------------------------------------------------ algorithms
CASES = {"baseline-mtp": ("baseline-mtp", "weighted"), "rho1-weighted": ("rho1-wmtp", "weighted"),
         "rho1-token_skip": ("rho1-wmtp", "token_skip"), "critic-wmtp": ("critic-wmtp", "weighted")}


FINE_TUNED: dict[str, tuple[Path, str]] = {}


def fine_tuned(case: str, zoo: Path, tmp_path_factory, monkeypatch, capsys) -> tuple[Path, str]:
    """The directory and stdout of one fine-tuning run of ``case`` (8 steps, registered in
    ``mlflow.db`` beside it), trained by the first test that asks for it."""
    if case not in FINE_TUNED:
        algo, mode = CASES[case]
        tmp = tmp_path_factory.mktemp(case)
        write(tmp / "c.yaml", config(tmp, zoo))
        write(tmp / "r.yaml", recipe(algo, mode))
        code, out, err = run(tmp, monkeypatch, capsys, "--verbose")
        assert code == 0, err[-3000:]
        FINE_TUNED[case] = tmp, out
    return FINE_TUNED[case]


@pytest.mark.parametrize("case", list(CASES))
def test_each_algorithm_fine_tunes_the_pretrained_model_and_registers_it(case, zoo, tmp_path_factory, monkeypatch,
                                                                        capsys):
    algo, mode = CASES[case]
    tmp_path, out = fine_tuned(case, zoo, tmp_path_factory, monkeypatch, capsys)
    assert "paths.models.base: DistilGPT2MTP (gpt2, 2 layers, vocabulary 50257), 4 heads" in out
    assert f"models:/wmtp_{algo}/1" in out
    losses = trainer_state(tmp_path, "hf", 8)["losses"]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), f"the loss did not fall: {losses}"
    state = trainer_state(tmp_path, "hf", 8)
    assert state["model_config"]["kind"] == "hf" and state["model_config"]["n_future"] == 4
    if algo == "critic-wmtp":  # the value head is part of the resume state
        assert set(state["algo"]["value_head"]) and state["algo"]["pretrained"] is True

    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version(f"wmtp_{algo}", "1")
    assert version.tags["wmtp.run"] == "hf"
    mlflow.set_registry_uri(store)
    files = {f.path for f in mlflow.artifacts.list_artifacts(artifact_uri=f"models:/wmtp_{algo}/1/model")}
    assert {"model/model.safetensors", "model/mtp_heads.safetensors", "model/wmtp.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))], "no pickle in the registry"
    # the flavor names the base model that was fine-tuned, not the temporary folder it was logged from
    from mlflow.models import Model

    flavor = Model.load(f"models:/wmtp_{algo}/1").flavors["transformers"]
    assert flavor["source_model_name"] == str(zoo / "distilgpt2-mtp")


# ------------------------------------------------------------------------------ the final model
def test_the_final_model_is_a_hugging_face_folder_that_from_pretrained_loads(zoo, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = config(tmp_path, zoo, mlflow=None, storage={"final": {"sink": "local"}})
    named = os.path.relpath(zoo / "distilgpt2-mtp", tmp_path)  # as a user writes it, relative
    c["paths"]["models"]["base"] = named
    write(tmp_path / "c.yaml", c)
    write(tmp_path / "r.yaml", recipe())
    code, out, err = run(tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    final = tmp_path / "ck" / "hf" / "final"
    names = {p.name for p in final.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "mtp_heads.safetensors", "wmtp.json",
            "manifest.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt"))]
    meta = json.loads((final / "wmtp.json").read_text())
    assert meta["n_future"] == 4 and meta["algo"] == "baseline-mtp" and meta["head"] == "linear"
    mtp_config = json.loads((final / "config.json").read_text())["mtp_config"]
    assert mtp_config["n_future_tokens"] == 4
    assert mtp_config["base_model"] == meta["base_model"] == named, "the base model as the run named it, in both"
    manifest = json.loads((final / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == names - {"manifest.json"}, "every file is committed"

    plain = AutoModelForCausalLM.from_pretrained(final, local_files_only=True).eval()
    trained = trained_model(tmp_path, "hf", 8)
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, trained(IDS)[:, 0]), "head 0 is the plain causal LM"
    tok = AutoTokenizer.from_pretrained(final, local_files_only=True)
    assert tok.decode(IDS[0]) == "def add(a, b):\n    return"

    # the folder serves as a model of another run, verified first: a changed byte is refused
    from wmtp_core.config import load_settings
    from wmtp_core.engine import models
    from wmtp_core.errors import ModelLoadError
    from wmtp_core.plugins import make_plugin_manager
    from wmtp_core.session import model_loader

    settings = load_settings(str(tmp_path / "c.yaml"), str(tmp_path / "r.yaml"))
    load = model_loader(make_plugin_manager(), {})
    source = models.locate(str(final), "paths.models.ref", settings, load)
    assert source.info.architecture == "GPT2LMHeadModel" and source.folder == str(final)
    data = bytearray((final / "mtp_heads.safetensors").read_bytes())
    data[-1] ^= 1
    (final / "mtp_heads.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="mtp_heads.safetensors"):
        models.locate(str(final), "paths.models.ref", settings, load)


ROUND_TRIP = """
import sys, torch, mlflow, mlflow.transformers
from safetensors.torch import save_file
mlflow.set_tracking_uri(sys.argv[1])
parts = mlflow.transformers.load_model(sys.argv[2], return_type="components")
model, tok = parts["model"].eval(), parts["tokenizer"]
ids = tok("def add(a, b):\\n    return", return_tensors="pt")
with torch.no_grad():
    logits = model(**ids).logits
out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
save_file({"logits": logits.contiguous(), "ids": ids["input_ids"], "generated": out}, sys.argv[3])
print(type(model).__name__, type(tok).__name__)
"""


def test_the_registered_model_round_trips_through_mlflow_in_a_fresh_process(zoo, tmp_path_factory, monkeypatch,
                                                                             capsys):
    from safetensors.torch import load_file

    tmp_path, _ = fine_tuned("baseline-mtp", zoo, tmp_path_factory, monkeypatch, capsys)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    proc = zygote.run(["-c", ROUND_TRIP, store, "models:/wmtp_baseline-mtp/1", str(tmp_path / "out.safetensors")],
                      cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["GPT2LMHeadModel", "GPT2Tokenizer"]
    got = load_file(tmp_path / "out.safetensors")
    assert torch.equal(got["ids"], IDS)
    trained = trained_model(tmp_path, "hf", 8)
    with torch.no_grad():
        assert torch.equal(got["logits"], trained(IDS)[:, 0])
    assert got["generated"].shape[1] == IDS.shape[1] + 6 and torch.equal(got["generated"][:, :IDS.shape[1]], IDS)

    # and back: the registered model is the base of a new run, its extra heads included
    write(tmp_path / "c2.yaml", config(tmp_path, zoo, paths={
        "models": {"base": "models:/wmtp_baseline-mtp/1"}, "datasets": {"mbpp": MBPP},
        "checkpoints": {"base_path": f"file://{tmp_path}/ck2", "save_interval": 0}}))
    write(tmp_path / "r2.yaml", recipe(steps=1, run={"name": "again"}))
    code, out, err = run(tmp_path, monkeypatch, capsys, "--config", "c2.yaml", "--recipe", "r2.yaml", "--verbose")
    assert code == 0, err[-3000:]
    assert "extra heads loaded from mtp_heads.safetensors" in err + out
    assert not list(Path("/tmp").glob("wmtp-model-*")) or all(
        p.stat().st_mtime < (tmp_path / "c2.yaml").stat().st_mtime for p in Path("/tmp").glob("wmtp-model-*")), \
        "the downloaded folder was left behind"


# ------------------------------------------------------------------------------ resume, FSDP
def test_sigkill_and_resume_of_a_pretrained_model_is_bit_exact(zoo, tmp_path, monkeypatch, capsys):
    write(tmp_path / "c.yaml", config(tmp_path, zoo, mlflow=None, storage={"final": {"sink": "local"}}))
    write(tmp_path / "r.yaml", recipe("rho1-wmtp", steps=10, optim={"lr": 0.002, "scheduler": "cosine",
                                                                  "warmup_ratio": 0.1}))
    code, _, err = run(tmp_path, monkeypatch, capsys, "--run-name", "full")
    assert code == 0, err[-3000:]
    cut = zygote.run(["-c", KILLER, "6", "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "cut"],
                     cwd=tmp_path, timeout=300)
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-3000:]
    code, _, err = run(tmp_path, monkeypatch, capsys, "--run-name", "cut", "--resume", "latest")
    assert code == 0, err[-3000:]
    assert "step_4" in err
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ck" / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "ck" / "cut" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(tmp_path / "ck" / "full" / "final" / "mtp_heads.safetensors")
    b = load_file(tmp_path / "ck" / "cut" / "final" / "mtp_heads.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert trainer_state(tmp_path, "full", 10)["losses"] == trainer_state(tmp_path, "cut", 10)["losses"]
    # what was stored is evaluated alike: the resume state of step 10 (its record names the base
    # folder, whose tokenizer it uses) and the final folder hold the same weights
    a = evaluated_samples(tmp_path / "ck" / "full" / "step_10", tmp_path / "a.jsonl", capsys)
    b = evaluated_samples(tmp_path / "ck" / "full" / "final", tmp_path / "b.jsonl", capsys, "--speculative")
    assert a == b and len(a) == 3 and any(s["completion"] for s in a)


def evaluated_samples(source: Path, out: Path, capsys, *extra: str) -> list[dict]:
    """``wmtp evaluate SOURCE`` on three MBPP problems of the origin's test file, greedy."""
    from wmtp_core.cli import main as wmtp

    code = wmtp(["evaluate", str(source), "--tasks", "mbpp", "--mbpp", f"{MBPP}/test.jsonl", "--limit", "3",
                 "--max-new-tokens", "16", "--out", str(out), "--allow-code-execution", *extra])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in out.read_text().splitlines()]


def test_two_fsdp_ranks_shard_the_pretrained_model_and_register_it_once(zoo, tmp_path):
    """critic-wmtp with the DistilBERT reward model: decoder layers, extra heads and the value head
    sharded; the final model gathered once."""
    c = config(tmp_path, zoo, devices={"fsdp": {"enabled": True, "auto_wrap": True}})
    c["paths"]["checkpoints"]["save_interval"] = 2
    write(tmp_path / "c.yaml", c)
    write(tmp_path / "r.yaml", recipe("critic-wmtp", steps=4))
    proc = zygote.ranks(2, ["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r.yaml"], cwd=tmp_path,
                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "ck" / "hf"
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_2", "step_4"]
    for step in ("step_2", "step_4"):
        assert list((run_dir / step).glob("manifest*")) == [run_dir / step / "manifest.json"]
        m = json.loads((run_dir / step / "manifest.json").read_text())
        assert m["meta"]["world_size"] == 2 and m["meta"]["format"] == "dcp"
        assert len([f for f in m["files"] if f["path"].endswith(".distcp")]) == 2
    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    versions = client.search_model_versions("name='wmtp_critic-wmtp'")
    assert [str(v.version) for v in versions] == ["1"], (proc.stdout[-3000:], proc.stderr[-3000:])


# ------------------------------------------------------------------------------ bad input
def bad_run(tmp_path, monkeypatch, capsys, zoo, **models) -> str:
    paths = config(tmp_path, zoo)["paths"]
    paths["models"].update(models)
    write(tmp_path / "c.yaml", config(tmp_path, zoo, paths=paths))
    write(tmp_path / "r.yaml", recipe("rho1-wmtp"))
    code, out, err = run(tmp_path, monkeypatch, capsys)
    assert code == 2, out + err
    assert "Traceback" not in err and not (tmp_path / "ck").exists(), "refused before step 1, nothing written"
    return " ".join(err.split())


def test_a_model_folder_without_weights_is_refused_before_step_1(zoo, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-weights"
    causal_lm(empty)
    (empty / "model.safetensors").unlink()
    err = bad_run(tmp_path, monkeypatch, capsys, zoo, base=str(empty))
    assert f"paths.models.base: {empty} holds no weights (model.safetensors or model.safetensors.index.json)" in err


def test_pickled_weights_are_refused_without_being_read(zoo, tmp_path, monkeypatch, capsys):
    pickled = tmp_path / "pickled"
    causal_lm(pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    err = bad_run(tmp_path, monkeypatch, capsys, zoo, ref=str(pickled))
    assert "paths.models.ref:" in err and "pytorch_model.bin, a pickle that can run code" in err


def test_a_reference_model_with_another_vocabulary_is_refused_naming_both(zoo, tmp_path, monkeypatch, capsys):
    other = tmp_path / "bert-vocab-lm"
    causal_lm(other, "tiny-reward-model-gpt2", vocab_size=30522, tokenizer=False)
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (other / f).write_bytes((zoo / "tiny-reward-model" / f).read_bytes())
    err = bad_run(tmp_path, monkeypatch, capsys, zoo, ref=str(other))
    assert (f"paths.models.ref: {other} uses DistilBertTokenizer with 30522 tokens, the base model "
            "GPT2Tokenizer with 50257 tokens") in err
    assert "must share the base model's vocabulary" in err


def test_code_in_a_model_folder_runs_only_with_the_flag(zoo, tmp_path, monkeypatch, capsys):
    coded = tmp_path / "coded"
    causal_lm(coded)
    (coded / "modeling_mtp.py").write_text("raise SystemExit('this code must not run')\n")
    err = bad_run(tmp_path, monkeypatch, capsys, zoo, base=str(coded))
    assert (f"paths.models.base: {coded}/modeling_mtp.py is Python code that would run when the model is "
            "loaded; WMTP runs a model folder's code only with paths.models.trust_remote_code: true") in err
    # with the flag, the dry run says that it will run
    paths = config(tmp_path, zoo)["paths"]
    paths["models"].update(base=str(coded), trust_remote_code=True)
    write(tmp_path / "c.yaml", config(tmp_path, zoo, paths=paths))
    code, out, err = run(tmp_path, monkeypatch, capsys, "--dry-run")
    assert code == 0, err
    assert "(its code runs: trust_remote_code)" in out


# ------------------------------------------------------------------------------ pieces
def test_transformer_heads_and_the_record_rebuild_the_same_model(zoo, tmp_path):
    """``model.head: transformer``: one transformer layer per extra head feeding the LM head; the
    export's folder and the stored record both give back the very same model."""
    from transformers import AutoTokenizer

    from wmtp_core.engine import hf
    from wmtp_core.engine.models import rebuild

    info = hf.inspect(str(zoo / "distilgpt2-mtp"), "paths.models.base")
    model, loaded = hf.build_mtp(info, str(zoo / "distilgpt2-mtp"), 3, "transformer", "paths.models.base")
    assert not loaded and len(model.heads) == 2
    model.eval()
    with torch.no_grad():
        logits = model(IDS)
    assert logits.shape == (1, 3, IDS.shape[1], 50257)
    record = {"kind": "hf", "base": "x", "n_future": 3, "head": "transformer",
              "config": model.base.config.to_dict()}
    again = rebuild(record, {k: v.clone() for k, v in model.state_dict().items()}, "test")
    with torch.no_grad():
        assert torch.equal(again(IDS), logits)
    tok = AutoTokenizer.from_pretrained(zoo / "distilgpt2-mtp", local_files_only=True)
    folder = hf.export(model, tok, str(tmp_path / "out"), {"algo": "baseline-mtp"})
    info2 = hf.inspect(folder, "paths.models.base")
    assert info2.declared_heads == 3
    back, loaded = hf.build_mtp(info2, folder, 3, "transformer", "paths.models.base")
    assert loaded, "the extra heads are read back from mtp_heads.safetensors"
    with torch.no_grad():
        assert torch.allclose(back.eval()(IDS), logits, atol=1e-5)


def test_a_batch_padded_to_its_longest_row_has_the_loss_of_one_padded_to_max_length(zoo):
    """Trimming a batch's padding columns (``data.trimmed``) changes no row's loss: causal
    attention keeps every real token from seeing the padding after it."""
    from wmtp_core.engine import hf
    from wmtp_core.engine.algorithms import head_ce, weighted_loss
    from wmtp_core.engine.data import trimmed

    info = hf.inspect(str(zoo / "distilgpt2-mtp"), "paths.models.base")
    model, _ = hf.build_mtp(info, str(zoo / "distilgpt2-mtp"), 3, "transformer", "paths.models.base")
    model.eval()
    torch.manual_seed(0)
    lengths = torch.tensor([9, 23, 14])
    ids = torch.randint(1, 50000, (3, 64))
    ids[torch.arange(64)[None, :] >= lengths[:, None]] = 50256
    short, same = trimmed(ids, lengths)
    assert short.shape == (3, 23) and same is lengths
    with torch.no_grad():
        full = weighted_loss(*head_ce(model(ids), ids, lengths), torch.ones(3, 3, 64))
        cut = weighted_loss(*head_ce(model(short), short, lengths), torch.ones(3, 3, 23))
    assert torch.allclose(full, cut, rtol=1e-5), (float(full), float(cut))


def test_a_record_that_lies_about_its_shapes_is_refused_before_allocation(zoo):
    from wmtp_core.engine import hf
    from wmtp_core.engine.models import rebuild
    from wmtp_core.errors import ModelLoadError

    info = hf.inspect(str(zoo / "distilgpt2-mtp"), "paths.models.base")
    model, _ = hf.build_mtp(info, str(zoo / "distilgpt2-mtp"), 2, "linear", "paths.models.base")
    config = model.base.config.to_dict()
    weights = model.state_dict()
    with pytest.raises(ModelLoadError, match="do not fit the architecture"):
        rebuild({"kind": "hf", "n_future": 2, "head": "linear", "config": {**config, "n_embd": 128}}, weights, "x")
    with pytest.raises(ModelLoadError, match="auto_map"):
        rebuild({"kind": "hf", "n_future": 2, "head": "linear", "config": {**config, "auto_map": {"a": "b"}}},
                weights, "x")
    with pytest.raises(ModelLoadError, match="model type 'evil'"):
        rebuild({"kind": "hf", "n_future": 2, "head": "linear", "config": {**config, "model_type": "evil"}},
                weights, "x")


def test_wmtp_register_stores_the_final_folder_from_a_resume_checkpoint(zoo, tmp_path, monkeypatch, capsys):
    """A run that stored no final model: ``wmtp register`` rebuilds the Hugging Face folder from
    its last resume checkpoint (the tokenizer from the base model it records)."""
    from wmtp_core.cli import main as wmtp

    paths = config(tmp_path, zoo)["paths"]
    paths["checkpoints"]["save_final"] = False
    write(tmp_path / "c.yaml", config(tmp_path, zoo, paths=paths))
    write(tmp_path / "r.yaml", recipe(steps=4))
    code, out, err = run(tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert "models:/" not in out
    write(tmp_path / "reg.yaml", config(tmp_path, zoo))
    code = wmtp(["register", str(tmp_path / "ck" / "hf" / "step_4"), "--config", str(tmp_path / "reg.yaml")])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "models:/wmtp_baseline-mtp/1" in out

    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    parts = mlflow.transformers.load_model("models:/wmtp_baseline-mtp/1", return_type="components")
    trained = trained_model(tmp_path, "hf", 4)
    with torch.no_grad():
        assert torch.equal(parts["model"].eval()(IDS).logits, trained(IDS)[:, 0])
    assert parts["tokenizer"].decode(IDS[0]) == "def add(a, b):\n    return"


def test_a_bf16_final_model_is_registered_at_half_the_bytes_and_loads_back(zoo, tmp_path, monkeypatch, capsys):
    import mlflow

    sizes = {}
    for dtype in ("fp32", "bf16"):
        tmp = tmp_path / dtype
        tmp.mkdir()
        write(tmp / "c.yaml", config(tmp, zoo, storage={"final": {"sink": "mlflow_registry", "dtype": dtype}}))
        write(tmp / "r.yaml", recipe(steps=2))
        code, out, err = run(tmp, monkeypatch, capsys)
        assert code == 0, err[-3000:]
        store = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        files = mlflow.artifacts.list_artifacts(artifact_uri="models:/wmtp_baseline-mtp/1/model")
        sizes[dtype] = sum(f.file_size for f in files if f.path.endswith(".safetensors"))
        parts = mlflow.transformers.load_model("models:/wmtp_baseline-mtp/1", return_type="components")
        want = torch.float32 if dtype == "fp32" else torch.bfloat16
        assert {p.dtype for p in parts["model"].parameters()} == {want}
        state = trainer_state(tmp, "hf", 2)
        assert state["model_config"]["kind"] == "hf"
        resume = torch.load(tmp / "ck" / "hf" / "step_2" / "model.pt", weights_only=True)
        assert {v.dtype for v in resume.values() if v.is_floating_point()} == {torch.float32}
    assert 0.45 < sizes["bf16"] / sizes["fp32"] < 0.55, sizes
