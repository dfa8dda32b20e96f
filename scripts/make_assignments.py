"""Make the coursework: student notebooks and grading bundles from the master notebooks.

Each assignment is one master notebook, ``assignments/NAME.ipynb``, in the format of
otter-grader's ``otter assign`` (questions, solutions and public/hidden tests marked with raw
cells). This script runs otter assign on it and writes ``assignments/dist/NAME/`` (ignored by
git)::

    student/NAME.ipynb               the notebook to hand out: solutions replaced by prompts,
                                     hidden tests removed, the public tests embedded in it (so the
                                     single file works in Colab and locally, on a CPU)
    autograder/NAME-autograder.zip   the grading bundle: every test, hidden ones included
                                     (`otter run` grades with it locally; Gradescope takes it too)
    autograder/NAME.ipynb            otter's solutions notebook (the master, markers and all)
    solutions/NAME.ipynb             the answer key: the student notebook with the master's
                                     solutions filled in

and, unless ``--no-check``, grades the answer key with the bundle and stops with an error
unless it gets full marks. It also stops if a line of a solution would be in the student
version.

Usage (from the repository root)::

    python scripts/make_assignments.py                        # every assignment
    python scripts/make_assignments.py a2                     # one (a name or a prefix of one)
    python scripts/make_assignments.py grade a1 hand-ins/     # grade submissions (files or folders)
    python scripts/make_assignments.py grade a1 hand-ins/ --csv a1.csv --feedback a1-feedback/
    python scripts/make_assignments.py grade a1 hand-ins/ --feedback a1-feedback/ --public-only

Grading runs each submission top to bottom in a fresh kernel on this machine (no Docker): it
needs the book's requirements installed (``pip install -r requirements.txt``).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import io
import json
import os
import re
import shutil
import sys
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = ROOT / "assignments"
DIST = ASSIGNMENTS / "dist"

ANSWER_TAG = "otter_answer_cell"              # otter's tag on a student answer cell
SOLUTION_TAG = "otter_assign_solution_cell"   # otter's tag on a solution cell (autograder notebook)
_CHECK = re.compile(r'^grader\.check\("(\w+)"\)$')


class AssignmentError(Exception):
    """A master notebook that cannot make a sound assignment (its solutions fail its tests, or
    its student version would show a solution)."""


@dataclass
class Assignment:
    """What :func:`build` made for one master notebook."""
    name: str
    master: Path
    student: Path             # the notebook to hand out
    autograder_zip: Path      # the grading bundle
    solutions: Path           # the student notebook with the solutions filled in
    master_results: object = None   # otter's GradingResults of the solutions (None with check=False)


# ---------------------------------------------------------------------------------------------
# Reading master notebooks
# ---------------------------------------------------------------------------------------------
def masters(names=None) -> list[Path]:
    """The master notebooks, ``assignments/*.ipynb``, or those whose names start with ``names``."""
    found = sorted(ASSIGNMENTS.glob("*.ipynb"))
    if not names:
        return found
    chosen = []
    for prefix in names:
        hits = [m for m in found if m.stem == prefix or m.stem.startswith(prefix)]
        if len(hits) != 1:
            raise SystemExit(f"{prefix!r} matches {[m.stem for m in hits] or 'no assignment'}; "
                             f"the assignments are {[m.stem for m in found]}")
        chosen += hits
    return chosen


def _source(cell) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def solution_lines(master: Path | nbformat.NotebookNode) -> list[str]:
    """Every line of every solution in a master notebook (stripped, non-empty): what must never
    appear in the student version."""
    nb = nbformat.read(str(master), as_version=4) if isinstance(master, Path) else master
    lines, inside = [], False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for line in _source(cell).splitlines():
            stripped = line.strip()
            if re.match(r"#\s*BEGIN SOLUTION", stripped):
                inside = True
            elif re.match(r"#\s*END SOLUTION", stripped):
                inside = False
            elif inside and stripped:
                lines.append(stripped)
            elif stripped.endswith("# SOLUTION"):
                lines.append(stripped[: -len("# SOLUTION")].strip())
    return lines


def clean_solution(source: str) -> str:
    """A solution cell as a student who solved it would have written it: otter's solution
    markers and the prompt block removed."""
    out, in_prompt = [], False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.endswith("# BEGIN PROMPT"):
            in_prompt = True
        elif stripped.endswith("# END PROMPT"):
            in_prompt = False
        elif not in_prompt and not re.match(r"#\s*(BEGIN|END) SOLUTION", stripped):
            out.append(line)
    return "\n".join(out)


def question_of_cells(nb) -> dict[int, str]:
    """For each answer/solution cell, the question whose ``grader.check`` cell follows it."""
    owner, pending = {}, []
    for i, cell in enumerate(nb.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if ANSWER_TAG in tags or SOLUTION_TAG in tags:
            pending.append(i)
        match = _CHECK.match(_source(cell).strip()) if cell.cell_type == "code" else None
        if match:
            owner.update({j: match.group(1) for j in pending})
            pending = []
    if pending:
        raise ValueError(f"answer cells {pending} have no grader.check cell after them")
    return owner


def fill_in(student, solutions_nb, questions=None, replace: dict | None = None):
    """A copy of the student notebook with the master's solutions put back into its answer
    cells (all of them, or those of ``questions``). ``replace`` maps a question to source code
    to put in its answer cell instead (to make a deliberately wrong answer)."""
    student = nbformat.from_dict(json.loads(json.dumps(student)))
    answers = [i for i, c in enumerate(student.cells) if ANSWER_TAG in c.metadata.get("tags", [])]
    solutions = [c for c in solutions_nb.cells if SOLUTION_TAG in c.metadata.get("tags", [])]
    if len(answers) != len(solutions):
        raise ValueError(f"{len(answers)} answer cells but {len(solutions)} solution cells")
    owner = question_of_cells(student)
    for i, solution in zip(answers, solutions):
        question = owner[i]
        if replace and question in replace:
            student.cells[i].source = textwrap.dedent(replace[question]).strip("\n")
        elif questions is None or question in questions:
            student.cells[i].source = clean_solution(_source(solution))
    return student


# ---------------------------------------------------------------------------------------------
# The student notebook's grader cell, with the public tests inside
# ---------------------------------------------------------------------------------------------
def _grader_cell_index(nb) -> int:
    hits = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "otter.Notebook(" in _source(c)]
    if len(hits) != 1:
        raise ValueError(f"expected one cell that creates otter.Notebook, found {len(hits)}")
    return hits[0]


def embedded_grader_cell(name: str, public_tests: dict[str, str]) -> nbformat.NotebookNode:
    """The cell that writes the public tests next to the notebook and creates ``grader``."""
    blob = base64.b64encode(zlib.compress(json.dumps(public_tests, sort_keys=True).encode(), 9)).decode()
    chunks = textwrap.wrap(blob, 88)
    source = "\n".join([
        "# @title The grader: run this cell (nothing to change in it)",
        "# It writes this assignment's public tests to public_tests/ next to the notebook (in Colab too)",
        "# and creates `grader`: after each question, `grader.check(\"q1\")` runs that question's tests",
        "# on your code. The grade adds hidden tests that check more.",
        "import base64, json, pathlib, zlib",
        "import otter",
        "",
        f'TESTS = pathlib.Path("public_tests") / "{name}"',
        "TESTS.mkdir(parents=True, exist_ok=True)",
        "_tests = json.loads(zlib.decompress(base64.b64decode(",
        *[f'    "{chunk}"' for chunk in chunks],
        ")))",
        "for _question, _code in _tests.items():",
        '    (TESTS / f"{_question}.py").write_text(_code)',
        "grader = otter.Notebook(tests_dir=str(TESTS))",
    ])
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["cellView"] = "form"                       # Colab: show the title, hide the code
    cell.metadata["jupyter"] = {"source_hidden": True}       # Jupyter: collapse the code
    cell.metadata["editable"] = False
    cell.metadata["deletable"] = False
    return cell


def public_tests_of(nb) -> dict[str, str]:
    """The public tests embedded in a student notebook by :func:`embedded_grader_cell`."""
    source = _source(nb.cells[_grader_cell_index(nb)])
    blob = "".join(re.findall(r'^\s+"([A-Za-z0-9+/=]+)"$', source, flags=re.M))
    return json.loads(zlib.decompress(base64.b64decode(blob)))


# ---------------------------------------------------------------------------------------------
# Building and grading
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _kernel_env():
    """The environment of the kernels that run graded notebooks, for the time of a grading:
    their working folder is a temporary one, so put this checkout on PYTHONPATH (ddpm_lib then
    imports even where it is not pip-installed), and give them one CPU thread unless
    OMP_NUM_THREADS says otherwise (the tests use small tensors; more threads only contend)."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in paths if p != str(ROOT)]])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def grade(submission: str | Path, autograder_zip: str | Path, quiet: bool = True, debug: bool = False):
    """Grade one notebook with otter (no Docker): run it top to bottom in a fresh kernel, then
    every test, hidden ones included. Returns otter's ``GradingResults`` (``.total``,
    ``.possible``, ``.results[question].score``, ``.summary()``, ``.notebook`` as executed).
    With ``debug``, an error in any cell raises instead of being recorded."""
    from otter.api import grade_submission
    sink = io.StringIO()
    with _kernel_env(), contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
        return grade_submission(str(submission), str(autograder_zip), quiet=quiet, debug=debug)


def build(master: Path, dist: Path = DIST, check: bool = True, quiet: bool = True) -> Assignment:
    """Run otter assign on ``master`` and write ``dist/NAME/`` (see the module docstring)."""
    from otter.assign import main as otter_assign
    master = Path(master).resolve()
    name = master.stem
    out = Path(dist).resolve() / name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        otter_assign(str(master), str(out), no_pdfs=True, no_run_tests=True)

    # the grading bundle, under a name without otter's timestamp
    zips = list((out / "autograder").glob(f"{name}-autograder_*.zip"))
    assert len(zips) == 1, zips
    autograder_zip = zips[0].rename(out / "autograder" / f"{name}-autograder.zip")

    # the student notebook: one file, its public tests inside
    student_path = out / "student" / f"{name}.ipynb"
    student = nbformat.read(str(student_path), as_version=4)
    tests_dir = out / "student" / "tests"
    public = {p.stem: p.read_text() for p in sorted(tests_dir.glob("*.py"))}
    student.cells[_grader_cell_index(student)] = embedded_grader_cell(name, public)
    shutil.rmtree(tests_dir)
    leaks = leaked_solution_lines(master, student)
    if leaks:
        student_path.unlink()
        raise AssignmentError(f"{name}: these solution lines would be in the student version: {leaks}")
    nbformat.validate(student)
    nbformat.write(student, str(student_path))

    # the answer key: the student notebook with the solutions put back
    solutions_nb = nbformat.read(str(out / "autograder" / f"{name}.ipynb"), as_version=4)
    solutions_path = out / "solutions" / f"{name}.ipynb"
    solutions_path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(fill_in(student, solutions_nb), str(solutions_path))

    built = Assignment(name, master, student_path, autograder_zip, solutions_path)
    if check:
        results = grade(solutions_path, autograder_zip)
        if results.total != results.possible or not results.possible:
            raise AssignmentError(f"{name}: the solutions get {results.total} / {results.possible}:\n"
                                  + results.summary())
        built.master_results = results
    return built


def leaked_solution_lines(master: Path, student) -> list[str]:
    """Solution lines of the master that appear in the student notebook or its public tests."""
    student_text = "\n".join(_source(c) for c in student.cells)
    student_text += "\n" + "\n".join(public_tests_of(student).values())
    student_lines = {line.strip() for line in student_text.splitlines()}
    return [line for line in solution_lines(master)
            if line in student_lines or (len(line) >= 20 and line in student_text)]


def scores(results) -> dict[str, float]:
    """Score per question, from otter's GradingResults."""
    return {q: results.get_score(q) for q in sorted(results.results)}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _shown(path: Path) -> str:
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _cmd_build(args) -> None:
    for master in masters(args.names):
        try:
            built = build(master, Path(args.dist), check=not args.no_check)
        except AssignmentError as error:
            raise SystemExit(f"error: {error}")
        print(f"{built.name}:")
        print(f"  hand out     {_shown(built.student)}")
        print(f"  grade with   {_shown(built.autograder_zip)}")
        print(f"  answer key   {_shown(built.solutions)}")
        if built.master_results is not None:
            print(f"  solutions get {built.master_results.total:g} / {built.master_results.possible:g} "
                  f"({', '.join(f'{q}: {s:g}' for q, s in scores(built.master_results).items())})")


def _cmd_grade(args) -> None:
    [master] = masters([args.assignment])
    zip_path = Path(args.dist) / master.stem / "autograder" / f"{master.stem}-autograder.zip"
    if not zip_path.exists():
        print(f"building {master.stem} first ...")
        build(master, Path(args.dist), check=False)
    files = []
    for item in map(Path, args.submissions):
        files += sorted(item.rglob("*.ipynb")) if item.is_dir() else [item]
    files = [f for f in files if ".ipynb_checkpoints" not in f.parts]
    if not files:
        raise SystemExit("no .ipynb submissions found")
    rows, questions = [], []
    for f in files:
        try:
            results = grade(f, zip_path)
        except Exception as error:     # not a notebook of this assignment, unreadable, ...: next one
            rows.append({"submission": str(f), "error": f"{type(error).__name__}: {error}"})
            print(f"{f}: NOT GRADED: {type(error).__name__}: {error}")
            continue
        per_question = scores(results)
        questions = questions or list(per_question)
        rows.append({"submission": str(f), **per_question, "total": results.total, "possible": results.possible,
                     "error": ""})
        print(f"{f}: {results.total:g} / {results.possible:g}  "
              + "  ".join(f"{q} {s:g}" for q, s in per_question.items()))
        if args.feedback:
            folder = Path(args.feedback)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{f.stem}.txt").write_text(f"{master.stem}: {results.total:g} / {results.possible:g}\n\n"
                                                  f"{results.summary(public_only=args.public_only)}\n")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["submission", *questions, "total", "possible", "error"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"scores written to {args.csv}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", default=str(DIST), help="output folder (default: assignments/dist)")
    if argv[:1] == ["grade"]:
        parser.add_argument("assignment", help="assignment name or prefix, e.g. a1")
        parser.add_argument("submissions", nargs="+", help="submitted .ipynb files, or folders of them")
        parser.add_argument("--csv", help="write the scores per question to this CSV file")
        parser.add_argument("--feedback", help="write one feedback file per submission into this folder")
        parser.add_argument("--public-only", action="store_true",
                            help="feedback files show the public tests' results only (the scores count all)")
        _cmd_grade(parser.parse_args(argv[1:]))
    else:
        parser.add_argument("names", nargs="*", help="assignments to build (names or prefixes; default: all)")
        parser.add_argument("--no-check", action="store_true", help="do not grade the solutions")
        _cmd_build(parser.parse_args(argv))


if __name__ == "__main__":
    main()
