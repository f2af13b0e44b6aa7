"""Hostile model folders and memory bombs (issue 18, items 4 and 6): each case of
``tests/model_bombs.py`` as ``paths.models.base``, through the dry run and the run, and, registered
as an MLflow transformers model in a real sqlite store, through ``models:/``. Every one is one line
naming the file, what is wrong and what is accepted, exit status 2, before anything is
allocated, and a registry load that failed leaves no ``wmtp-model-*`` folder behind.

Every command runs in a process of its own (forked from the tests' zygote) whose address space
is capped at 6 GiB and that is killed after a timeout: a regression (a 13 GB allocation, a
million layers laid out) fails the test with a MemoryError traceback or a timeout instead of
filling this machine or hanging the suite."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import zygote
from builders import merge, write
from conftest import migrated_mlflow_db
from model_bombs import CASES, SPARSE, expected, good_folder, make

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MEMORY = 6 << 30
TIMEOUT = 180
RUNS = """
import contextlib, io, json, resource, sys, tempfile
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
tempfile.tempdir = None  # the zygote's is cached: use this child's TMPDIR
from wmtp_core.run import main
results = []
for args in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(args)
    results.append([code, err.getvalue(), out.getvalue()])
print(json.dumps(results))
""".format(memory=MEMORY)
REGISTRY_CASES = [c for c in CASES if c not in SPARSE and c != "index naming ../"] + ["loop -> ."]


def runs(work: Path, *argvs: list[str]) -> list[tuple[int, str]]:
    """Each ``argv`` given to ``wmtp_core.run.main`` in one forked child (6 GiB, a timeout):
    ``[(exit status, stderr)]``. ``work/tmp`` is its temporary directory."""
    (work / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "HF_HUB_OFFLINE": "1"}
    proc = zygote.run(["-c", RUNS, json.dumps(argvs)], cwd=work, env=env, timeout=TIMEOUT)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    STDOUT[:] = [out for _, _, out in found]
    return [(code, err) for code, err, _ in found]


STDOUT: list[str] = []
"""What each command of the last :func:`runs` printed on stdout."""


def config_files(work: Path, base: str, mlflow: dict | None = None, models: dict | None = None,
                 **recipe) -> list[str]:
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "data" / "train.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    config = {"paths": {"models": {"base": base, **(models or {})}, "datasets": {"d": str(work / "data" / "train.txt")},
                        "checkpoints": {"base_path": f"file://{work}/ck", "save_interval": 2}},
              "mlflow": mlflow}
    rec = merge({"run": {"name": "hostile"}, "train": {"algo": "baseline-mtp", "max_steps": 2},
                 "data": {"train": {"sources": ["d"], "max_length": 16, "batch_size": 2}}}, recipe)
    return ["--config", write(work / "c.yaml", config), "--recipe", write(work / "r.yaml", rec)]


def same(line: str) -> str:
    """``line`` without the memory available, which changes from one moment to the next."""
    return re.sub(r"has [\d.]+ [kMGTP]?B of memory available", "has N of memory available", line)


def one_line(code: int, err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    assert code == 2 and len(err.strip().splitlines()) == 1, (code, err[-3000:])
    return " ".join(err.split())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """The good tiny GPT-2 and a spoilt copy of it for each case (``zoo/<i>``)."""
    root = tmp_path_factory.mktemp("zoo")
    good = good_folder(root / "good")
    for i, case in enumerate(CASES):
        make(case, good, root / str(i))
    return root


def folder_of(zoo: Path, case: str) -> Path:
    return zoo / str(list(CASES).index(case))


# ----------------------------------------------------------------------------- a folder by path
@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_folder_is_one_line_in_the_dry_run_and_the_run(zoo, tmp_path, case):
    folder = folder_of(zoo, case)
    args = config_files(tmp_path, str(folder))
    (dry, run) = runs(tmp_path, [*args, "--dry-run"], args)
    dry_line, run_line = one_line(*dry), one_line(*run)
    assert dry_line.startswith("error: paths.models.base: "), dry_line
    for words in expected(case, str(folder)):
        assert words in dry_line, (words, dry_line)
    assert same(run_line) == same(dry_line), "the run refuses in the dry run's words"
    assert not (tmp_path / "ck").exists(), "refused before anything was written"


@pytest.mark.parametrize("role,algo,case", [("ref", "rho1-wmtp", "vocab_size 50000000"),
                                             ("ref", "rho1-wmtp", "tokenizer.json 10^5 deep"),
                                             ("rm", "critic-wmtp", "header length 2^64-1"),
                                             ("rm", "critic-wmtp", "n_layer 1000000")])
def test_a_hostile_reference_or_reward_model_is_one_line_too(zoo, tmp_path, role, algo, case):
    folder = folder_of(zoo, case)
    args = config_files(tmp_path, str(zoo / "good"), models={role: str(folder)}, train={"algo": algo})
    (dry, run) = runs(tmp_path, [*args, "--dry-run"], args)
    line = one_line(*run)
    for words in expected(case, str(folder)):
        assert "training" in words or words in line, (words, line)
    assert line.startswith(f"error: paths.models.{role}: "), line
    if case != "tokenizer.json 10^5 deep":  # the dry run reads no reference tokenizer
        assert same(one_line(*dry)) == same(line)
    if case == "vocab_size 50000000":  # consulted, not trained: 4 bytes a parameter
        assert "(loading the model it describes would need 6.4 GB; this machine has" in line


def test_the_good_folder_passes_and_its_size_is_what_its_weights_hold(zoo, tmp_path):
    """The checks refuse no real folder: the dry run of the good one counts its parameters."""
    from safetensors import safe_open

    (dry,) = runs(tmp_path, [*config_files(tmp_path, str(zoo / "good")), "--dry-run"])
    assert dry[0] == 0, dry[1][-3000:]
    with safe_open(zoo / "good" / "model.safetensors", "pt") as f:
        held = {k: f.get_slice(k).get_shape() for k in f.keys()}
    vocab, width = held["transformer.wte.weight"]
    total = sum(math.prod(shape) for shape in held.values()) + 3 * vocab * width  # and 3 extra linear heads
    assert f"({total:,} parameters)" in STDOUT[0], STDOUT[0][-2000:]


def test_a_memory_bomb_says_what_its_weights_hold_and_the_memory_available(zoo, tmp_path):
    """The report's first case, word for word: the key, the value, the weights, the memory."""
    from wmtp_core.engine.model_size import host_available
    from wmtp_core.engine.weights_file import human

    folder = folder_of(zoo, "vocab_size 50000000")
    (dry,) = runs(tmp_path, [*config_files(tmp_path, str(folder)), "--dry-run"])
    line = one_line(*dry)
    assert (f"{folder}/config.json says vocab_size 50000000: a model of 1,600,033,664 parameters, but its "
            "weights (model.safetensors) hold 33,664 parameters in 27 tensors (134.7 kB; 2 layers, transformer.h.0 "
            "to transformer.h.1) (transformer.wte.weight [50000000, 32] is not among them)") in line
    assert "(training the model it describes would need 102.4 GB; this machine has " in line
    shown = line.rsplit("this machine has ", 1)[1].split(" of memory available")[0]
    value, unit = shown.split()
    assert unit == "GB" and abs(float(value) - host_available() / 1e9) < 2, (shown, human(host_available()))


@pytest.mark.parametrize("case", ["good", "vocab_size 50000000", "header length 2^40"])
def test_a_folder_on_s3_is_checked_from_its_headers_alone(zoo, s3_server, bucket, tmp_path, case):
    """On object storage the headers are read with ranged reads, never the weights: the same
    words as on local disk, and a good folder still trains (its private copy removed after)."""
    import fsspec

    local = zoo / "good" if case == "good" else folder_of(zoo, case)
    url = f"s3://{bucket}/models/{local.name}"
    fsspec.filesystem("s3", skip_instance_cache=True).put(f"{local}/", url, recursive=True)
    args = config_files(tmp_path, url)
    (dry, run) = runs(tmp_path, [*args, "--dry-run"], args)
    if case == "good":
        assert dry[0] == 0 and run[0] == 0, (dry[1][-3000:], run[1][-3000:])
        assert not [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("wmtp-model-")]
        return
    line = one_line(*dry)
    for words in expected(case, url):
        assert words in line, (words, line)
    assert same(one_line(*run)) == same(line)


# ----------------------------------------------------------------------------- the recipe's own model
@pytest.mark.parametrize("model", [{"d_model": 65536, "n_layers": 1024, "n_heads": 64},
                                   {"d_model": 8192, "n_layers": 64, "n_heads": 64}])
def test_a_recipe_model_this_machine_cannot_hold_is_one_line(tmp_path, model):
    args = ["--config", write(tmp_path / "c.yaml", {"mlflow": None, "paths": {"checkpoints": {
                "base_path": f"file://{tmp_path}/ck"}}}),
            "--recipe", write(tmp_path / "r.yaml", {"train": {"max_steps": 2}, "model": {**model, "max_seq_len": 32},
                                                    "data": {"train": {"sources": ["stdlib"], "max_length": 32}}})]
    (dry, run) = runs(tmp_path, [*args, "--dry-run"], args)
    line = one_line(*dry)
    assert line.startswith(f"error: {tmp_path / 'r.yaml'}: model: d_model {model['d_model']}, n_layers "
                           f"{model['n_layers']}, n_future 4, max_seq_len 32 is a model of "), line
    assert ("parameters; training it needs" in line and "(float32 weights, their gradients and Adam's two "
            "moments: 16 bytes a parameter), but this machine has" in line and "of memory available" in line)
    assert same(one_line(*run)) == same(line)


SMALL = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES = {
    "llama": {**SMALL, "num_key_value_heads": 2}, "qwen2": {**SMALL, "num_key_value_heads": 2},
    "mixtral": {**SMALL, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_neox": SMALL, "falcon": dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "opt": dict(vocab_size=1000, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32),
    "gpt_neo": dict(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]),
    "bert classifier": SMALL, "distilbert classifier": dict(vocab_size=1000, dim=32, hidden_dim=64, n_layers=2, n_heads=4),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_real_architectures_pass_and_their_declared_size_is_what_from_pretrained_builds(tmp_path, name):
    """The checks refuse no real folder: for each architecture, a folder ``save_pretrained`` wrote
    passes, and the size laid out on the meta device is the size ``from_pretrained`` allocates."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from wmtp_core.engine import hf, model_size

    model_type, _, kind = name.partition(" ")
    cls = AutoModelForSequenceClassification if kind else AutoModelForCausalLM
    cls.from_config(AutoConfig.for_model(model_type, **ARCHITECTURES[name])).save_pretrained(tmp_path / "m")
    info = hf.inspect(str(tmp_path / "m"), "paths.models.ref")
    plan = model_size.Budget(host=model_size.host_available())
    declared = model_size.check_folder(info, "paths.models.ref", plan)
    loaded = hf.from_pretrained(cls, str(tmp_path / "m"), "paths.models.ref", False)
    assert declared == sum(p.numel() for p in loaded.parameters())
    if not kind:  # the trained model: its extra heads counted too
        with_heads = model_size.check_folder(info, "paths.models.base", plan, heads=(4, "linear"))
        assert with_heads == declared + 3 * sum(p.numel() for p in loaded.get_output_embeddings().parameters())


def test_the_byte_level_size_by_formula_is_the_meta_layouts():
    from wmtp_core.engine.model import ModelConfig, count_parameters
    from wmtp_core.engine.model_size import byte_parameters

    for cfg in (ModelConfig(), ModelConfig(d_model=32, n_layers=1, n_heads=2, n_future=2, max_seq_len=32),
                ModelConfig(d_model=96, n_layers=7, n_heads=4, n_future=5, max_seq_len=17),
                ModelConfig(d_model=8, n_layers=3, n_heads=1, n_future=1, max_seq_len=1000)):
        assert byte_parameters(cfg) == count_parameters(cfg), cfg


def test_on_a_gpu_the_training_state_is_weighed_against_the_gpu_its_ranks_share():
    """The GPU branch of the memory check, without a GPU: the training state (16 bytes a
    parameter) on each GPU, shared by the FSDP ranks; the float32 weights in host memory first."""
    from wmtp_core.engine.model_size import Budget, check_memory
    from wmtp_core.errors import ModelLoadError

    gpu = Budget(host=100 << 30, gpu=80 << 30)
    check_memory("m", 4_000_000_000, 0, True, gpu)  # 64 GB of training state on an 85.9 GB GPU
    with pytest.raises(ModelLoadError) as e:
        check_memory("m", 6_000_000_000, 0, True, gpu)
    assert str(e.value) == ("m is a model of 6,000,000,000 parameters; training it needs 96.0 GB on each GPU "
                            "(float32 weights, their gradients and Adam's two moments: 16 bytes a parameter), but "
                            "the GPU has 85.9 GB")
    check_memory("m", 6_000_000_000, 0, True, Budget(host=100 << 30, gpu=80 << 30, shards=2))  # 48 GB a rank
    with pytest.raises(ModelLoadError) as e:  # sharded over 8 GPUs, but loaded whole in host memory first
        check_memory("m", 30_000_000_000, 0, True, Budget(host=100 << 30, gpu=80 << 30, shards=8))
    assert str(e.value) == ("m is a model of 30,000,000,000 parameters; loading it needs 120.0 GB (float32 "
                            "weights: 4 bytes a parameter), but this machine has 107.4 GB of memory available")
    with pytest.raises(ModelLoadError, match="loading it needs 96.0 GB on each GPU"):  # a frozen model: whole
        check_memory("m", 24_000_000_000, 0, False, Budget(host=1 << 40, gpu=80 << 30, shards=8))
    check_memory("m", 10**15, 0, True, Budget(host=None))  # a machine that does not say: nothing refused


# ----------------------------------------------------------------------------- through models:/
def _register(store: str, art: Path, folder: Path | None, name: str) -> Path:
    """``folder`` logged as an MLflow transformers model and registered as ``name`` version 1;
    returns the model's artifact directory on disk."""
    import mlflow

    art.mkdir(parents=True)
    (art / "MLmodel").write_text("flavors:\n  transformers:\n    model_binary: model\n    task: text-generation\n")
    if folder is not None:
        shutil.copytree(folder, art / "model")
    else:
        good_folder(art / "model")
    with mlflow.start_run():
        mlflow.log_artifacts(str(art), "model")
        run = mlflow.active_run().info
    mlflow.register_model(f"runs:/{run.run_id}/model", name)
    return Path(run.artifact_uri.removeprefix("file://")) / "model"


@pytest.fixture(scope="module")
def registry(zoo, tmp_path_factory):
    """A real sqlite MLflow store holding each case as ``hostile_<i>`` version 1, and a good folder
    whose artifacts hold a ``loop -> .`` link (``hostile_loop``)."""
    import mlflow

    from conftest import mlflow_environment_restored

    root = tmp_path_factory.mktemp("registry")
    store = migrated_mlflow_db(root / "mlflow.db")
    with mlflow_environment_restored():
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("hostile", f"file://{root}/artifacts"))
        names = {}
        for i, case in enumerate(REGISTRY_CASES):
            name = f"hostile_{i}"
            where = _register(store, root / "art" / str(i), folder_of(zoo, case) if case in CASES else None, name)
            if case == "loop -> .":
                (where / "model" / "loop").symlink_to(".")
            names[case] = f"models:/{name}/1"
    return store, names


@pytest.mark.parametrize("case", REGISTRY_CASES)
def test_a_hostile_registered_model_is_one_line_and_leaves_nothing_behind(registry, tmp_path, case):
    store, names = registry
    uri = names[case]
    args = config_files(tmp_path, uri, mlflow={"tracking_uri": store, "experiment": "runs"})
    (run,) = runs(tmp_path, args)
    line = one_line(*run)
    assert line.startswith(f"error: paths.models.base: {uri}"), line
    words = (("its artifacts nest deeper than 16 folders",) if case == "loop -> ." else expected(case, uri))
    for w in words:
        assert w in line, (w, line)
    assert not [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("wmtp-model-")], \
        "a failed registry load left its download behind"
