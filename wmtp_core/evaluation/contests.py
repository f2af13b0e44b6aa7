"""CodeContests (Li et al. 2022, AlphaCode), when its data is given: competitive-programming
problems whose solution is a whole program that reads standard input and writes standard output.

- **Data**: the dataset's own records (``deepmind/code_contests`` exported as JSON lines or a
  JSON array, one file per split): ``name``, ``description``, ``public_tests``,
  ``private_tests`` and ``generated_tests`` (each ``{"input": [...], "output": [...]}``), and
  ``solutions`` (``{"language": [...], "solution": [...]}``; language 3 is Python 3, the
  canonical solution). ``paths.datasets.codecontests`` names a folder of ``<split>.jsonl`` /
  ``<split>.json`` files, or one file. Nothing is downloaded.
- **Prompt**: the statement in a docstring, then a line that asks for a Python 3 program::

      \"\"\"\\n{description}\\n\"\"\"\\n# Python 3 solution (reads standard input, writes standard output)\\n

- **Program**: the completion is written to ``solution.py`` in the program's own directory and
  run with ``runpy`` once per test, in the same sandboxed process (never in the evaluator), with the
  test's input as ``sys.stdin`` (text and ``.buffer``) and its output captured; a sample passes
  when every test's output matches, compared token by token (whitespace-separated), as the
  dataset's own checker does for most problems. Tests are the private and generated ones when the
  record has them, else the public ones; at most :data:`MAX_TESTS` of them.
- Task ids are ``CodeContests/<name>``; stops are ``'\\n\"\"\"'`` and ``'\\n```'`` (a program may
  define functions, classes and ``if __name__`` blocks, so none of MBPP's stops apply).
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

from wmtp_core.bounded import read_bounded
from wmtp_core.errors import ConfigError
from wmtp_core.evaluation.tasks import MAX_FILE, Problem, records

STOPS = ('\n"""', "\n```")
MAX_TESTS = 50
PYTHON3 = 3
HARNESS = '''
import io as _io, runpy as _runpy, sys as _sys
with open("solution.py", "w", encoding="utf-8") as _f:
    _f.write(SOLUTION)
for _i, (_input, _expected) in enumerate(TESTS):
    _sys.stdin = _io.TextIOWrapper(_io.BytesIO(_input.encode()), encoding="utf-8")
    _out = _io.StringIO()
    _sys.stdout = _out
    try:
        _runpy.run_path("solution.py", run_name="__main__")
    except SystemExit:
        pass
    finally:
        _sys.stdout, _sys.stdin = _sys.__stdout__, _sys.__stdin__
    assert _out.getvalue().split() == _expected.split(), f"test {_i}: wrong output"
'''


def _pairs(tests: Any) -> list[tuple[str, str]]:
    if not isinstance(tests, dict):  # the origin's placeholders carry [] here
        return []
    return [(str(i), str(o)) for i, o in zip(tests.get("input") or [], tests.get("output") or [])]


def _tests(record: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = _pairs(record.get("private_tests")) + _pairs(record.get("generated_tests"))
    return (pairs or _pairs(record.get("public_tests")))[:MAX_TESTS]


def _canonical(record: dict[str, Any]) -> str:
    s = record.get("solutions") if isinstance(record.get("solutions"), dict) else {}
    for language, solution in zip(s.get("language") or [], s.get("solution") or []):
        if language == PYTHON3:
            return str(solution)
    return ""


def problem(record: dict[str, Any], where: str) -> Problem:
    if not isinstance(record.get("name"), str) or not isinstance(record.get("description"), str):
        raise ConfigError(f"{where}: a problem lacks name or description; accepted: CodeContests records "
                          "(name, description, public_tests, private_tests, generated_tests, solutions)")
    tests = _tests(record)
    if not tests:
        raise ConfigError(f"{where}: problem {record['name']!r} has no tests (public_tests, private_tests, "
                          "generated_tests: input and output lists)")
    prompt = f'"""\n{record["description"]}\n"""\n# Python 3 solution (reads standard input, writes standard output)\n'
    return Problem(task_id=f"CodeContests/{record['name']}", prompt=prompt, canonical=_canonical(record),
                   test=f"TESTS = {json.dumps(tests)}\n{HARNESS}", stdio=True)


def load(path: str, split: str = "test", storage_options: dict | None = None) -> list[Problem]:
    """The problems of the split ``split`` (``path``: a folder of split files, or one file)."""
    fs, root = fsspec.url_to_fs(path, **(storage_options or {}))
    if fs.isdir(root):
        found = [f"{root.rstrip('/')}/{split}{suffix}" for suffix in (".jsonl", ".json")]
        root = next((f for f in found if fs.isfile(f)), None)
        if root is None:
            raise ConfigError(f"paths.datasets.codecontests: {path} has no {split}.jsonl or {split}.json; "
                              "accepted: a folder of <split>.jsonl files, or one file")
    data = read_bounded(fs, root, MAX_FILE, "a CodeContests file (JSON or JSON lines)", where=path, error=ConfigError)
    return [problem(r, path) for r in records(data, path, "CodeContests problems")]
