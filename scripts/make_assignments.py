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
    autograder/NAME.ipynb            otter's solutions notebook (the master: solutions, hidden
                                     tests and all), and beside it otter's unzipped copy of the
                                     bundle's tests/, otter_config.json and requirements.txt
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
    python scripts/make_assignments.py grade a1 hand-ins/ --timeout 300   # seconds per submission

Grading runs each submission top to bottom in a fresh kernel on this machine (no Docker): it
needs the book's requirements installed (``pip install -r requirements.txt``). Each submission
is graded in a process of its own, stopped after ``--timeout`` seconds (default 120; 0: no
limit): its row then says "timeout" and grading goes on with the next. Ctrl-C stops the
submission being graded ("interrupted") and goes on with the next; Ctrl-C twice within two
seconds stops the run. The CSV gets each row as its submission finishes, so a stopped run
loses nothing that was graded. Submissions are named by their path under the folder given
(``alice/a1.ipynb``), in the CSV and in the feedback folder, so two hand-ins with the same file
name in different folders stay apart.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = ROOT / "assignments"
DIST = ASSIGNMENTS / "dist"

ANSWER_TAG = "otter_answer_cell"              # otter's tag on a student answer cell
SOLUTION_TAG = "otter_assign_solution_cell"   # otter's tag on a solution cell (autograder notebook)
_CHECK = re.compile(r'^grader\.check\("(\w+)"\)$')

DEFAULT_TIMEOUT = 120.0    # seconds per submission; a completed notebook takes about 5 s
DOUBLE_CTRL_C = 2.0        # two Ctrl-C within this many seconds stop a grading run


class AssignmentError(Exception):
    """A master notebook that cannot make a sound assignment (its solutions fail its tests, or
    its student version would show a solution)."""


class NotGraded(Exception):
    """A submission that got no grade. ``str(error)`` is what the CSV's ``error`` column says:
    "timeout", "interrupted", or the error that stopped otter (say, a notebook of another
    assignment); ``detail`` says more, for the instructor."""

    def __init__(self, error: str, detail: str = ""):
        super().__init__(error)
        self.detail = detail


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
# Building
# ---------------------------------------------------------------------------------------------
def build(master: Path, dist: Path = DIST, check: bool = True, quiet: bool = True) -> Assignment:
    """Run otter assign on ``master`` and write ``dist/NAME/`` (see the module docstring)."""
    from otter.assign import main as otter_assign
    master = Path(master).resolve()
    name = master.stem
    out = Path(dist).resolve() / name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink if quiet else sys.stdout):
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
        try:
            results = grade(solutions_path, autograder_zip)
        except NotGraded as error:
            raise AssignmentError(f"{name}: the answer key could not be graded: {error} {error.detail}".strip())
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


# ---------------------------------------------------------------------------------------------
# Grading one notebook, in a process of its own
# ---------------------------------------------------------------------------------------------
# The grading process runs otter (which starts the kernel that runs the notebook) and pickles
# ("graded", GradingResults) or ("error", "Type: message") into the file named by its 3rd argument.
_GRADING_PROCESS = ("import sys; sys.path.insert(0, sys.argv[1]); import make_assignments; "
                    "make_assignments._grade_in_this_process(*sys.argv[2:])")


def _grade_in_this_process(submission: str, autograder_zip: str, out: str, mode: str) -> None:
    from otter.api import grade_submission
    try:
        payload = ("graded", grade_submission(submission, autograder_zip, quiet=True, debug=mode == "debug"))
    except Exception as error:      # reported by the parent as the reason the submission has no grade
        payload = ("error", f"{type(error).__name__}: {error}")
    with open(out, "wb") as handle:
        pickle.dump(payload, handle)


def _grading_env(workdir: Path) -> dict:
    """The environment of a grading process and of the kernel it starts: this checkout first on
    PYTHONPATH (the kernel runs in a temporary folder, and ddpm_lib then imports even where it is
    not pip-installed); one CPU thread unless OMP_NUM_THREADS says otherwise (the tests use small
    tensors; more threads only contend); temporary files and the kernel's connection file in
    ``workdir``, which is removed afterwards, even when the process had to be killed."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("TMPDIR", "TEMP", "TMP", "JUPYTER_RUNTIME_DIR"):
        env[key] = str(workdir)
    return env


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (its children, theirs, ...), from /proc (Linux). Elsewhere
    none are found, and the kernel of a killed grading process ends by itself: ipykernel exits
    within a second or so of losing its parent."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:                  # the process ended meanwhile
            continue
        parent = int(text[text.rfind(")") + 2:].split()[1])   # after "pid (command) state"
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill a grading process and everything it started (the kernel). Only sends signals, so it
    may run in a signal handler; the caller waits for the process."""
    if process.returncode is not None:
        return
    for pid in [*_descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)


class _CtrlC:
    """Ctrl-C while :func:`skip_on_ctrl_c` is on: kill the grading process of the submission
    being graded (:func:`grade` then raises ``NotGraded("interrupted")``), and remember when."""

    def __init__(self):
        self.running: subprocess.Popen | None = None       # set by grade while a process runs
        self.interrupted: subprocess.Popen | None = None
        self.pressed: list[float] = []

    def __call__(self, signum, frame) -> None:
        self.pressed.append(time.monotonic())
        if self.running is not None and self.running.returncode is None:
            self.interrupted = self.running
            _kill_tree(self.running)

    def stop_requested(self) -> bool:
        """Whether the last two presses came within DOUBLE_CTRL_C seconds."""
        return len(self.pressed) >= 2 and self.pressed[-1] - self.pressed[-2] <= DOUBLE_CTRL_C

    def wait_for_a_second_press(self) -> bool:
        """After a press: wait until DOUBLE_CTRL_C seconds have passed since it, or until a
        second press; return whether grading should stop."""
        while not self.stop_requested() and time.monotonic() < self.pressed[-1] + DOUBLE_CTRL_C:
            time.sleep(0.05)
        return self.stop_requested()


_CTRL_C = _CtrlC()


@contextlib.contextmanager
def skip_on_ctrl_c():
    """For grading several submissions: while on, Ctrl-C (SIGINT) stops only the submission
    being graded, and ``.stop_requested()`` of what it yields says whether it was pressed twice
    within DOUBLE_CTRL_C seconds. (Outside the main thread, where Python cannot catch signals,
    Ctrl-C keeps its usual meaning.)"""
    if threading.current_thread() is not threading.main_thread():
        yield _CTRL_C
        return
    previous = signal.signal(signal.SIGINT, _CTRL_C)
    try:
        yield _CTRL_C
    finally:
        signal.signal(signal.SIGINT, previous)
        _CTRL_C.pressed.clear()


def _session_options() -> dict:
    """Start a grading process outside the terminal's process group, so that Ctrl-C reaches this
    script (which decides what to stop) and not the grading process."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _start_grading_process(submission: Path, autograder_zip: Path, workdir: Path, debug: bool,
                           quiet: bool) -> subprocess.Popen:
    command = [sys.executable, "-c", _GRADING_PROCESS, str(Path(__file__).resolve().parent),
               str(Path(submission).resolve()), str(Path(autograder_zip).resolve()),
               str(workdir / "results.pkl"), "debug" if debug else "grade"]
    output = open(workdir / "output.txt", "wb") if quiet else None
    try:
        return subprocess.Popen(command, env=_grading_env(workdir), stdin=subprocess.DEVNULL,
                                stdout=output, stderr=subprocess.STDOUT if quiet else None,
                                **_session_options())
    finally:
        if output is not None:
            output.close()


def _read_results(workdir: Path, returncode: int):
    """The GradingResults the grading process left in ``workdir``, or NotGraded saying why not."""
    out = workdir / "results.pkl"
    if not out.exists():
        log = workdir / "output.txt"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise NotGraded(f"the grading process ended without results (exit status {returncode})", tail)
    status, value = pickle.loads(out.read_bytes())
    if status == "error":
        raise NotGraded(value)
    if value.has_catastrophic_failure():
        raise NotGraded(f"grading failed: {value.catastrophic_error}")
    return value


def grade(submission: str | Path, autograder_zip: str | Path, *, timeout: float | None = DEFAULT_TIMEOUT,
          debug: bool = False, quiet: bool = True):
    """Grade one notebook with otter (no Docker): in a process of its own, run it top to bottom
    in a fresh kernel, then every test, hidden ones included. Returns otter's ``GradingResults``
    (``.total``, ``.possible``, ``.results[question]``, ``.summary()``, ``.notebook`` as
    executed).

    Raises :class:`NotGraded` when there is no grade: "timeout" when it still runs after
    ``timeout`` seconds (None or 0: no limit), "interrupted" on Ctrl-C under
    :func:`skip_on_ctrl_c`, otherwise otter's error (a notebook of another assignment, not a
    notebook, ...). In every case the process and its kernel are gone when it returns. With
    ``debug``, an error in any cell makes it a NotGraded instead of being recorded."""
    with tempfile.TemporaryDirectory(prefix="grading-", ignore_cleanup_errors=True) as folder:
        workdir = Path(folder)
        process = _start_grading_process(Path(submission), Path(autograder_zip), workdir, debug, quiet)
        _CTRL_C.running = process
        try:
            process.wait(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            raise NotGraded("timeout", f"still running after {timeout:g} s, when it was stopped") from None
        finally:
            _CTRL_C.running = None
            _kill_tree(process)         # a timeout, or an exception here (KeyboardInterrupt): stop it
            process.wait()
        if _CTRL_C.interrupted is process:
            raise NotGraded("interrupted", "stopped with Ctrl-C")
        return _read_results(workdir, process.returncode)


def scores(results) -> dict[str, float]:
    """Score per question, from otter's GradingResults."""
    return {q: results.get_score(q) for q in sorted(results.results, key=_natural)}


def _natural(name: str):
    """Sort key that puts q2 before q10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def questions_of(autograder_zip: str | Path) -> list[str]:
    """The questions a bundle grades (its tests/*.py), in order."""
    with zipfile.ZipFile(autograder_zip) as bundle:
        names = [Path(n).stem for n in bundle.namelist() if n.startswith("tests/") and n.endswith(".py")]
    return sorted(names, key=_natural)


# ---------------------------------------------------------------------------------------------
# What a grade says: points per question, and the cells that raised an error
# ---------------------------------------------------------------------------------------------
def _failed_tests(public: int, hidden: int) -> str:
    """'1 hidden test failed', '2 public tests and 1 hidden test failed', ..."""
    parts = [f"{n} {kind} test{'s' if n > 1 else ''}" for n, kind in ((public, "public"), (hidden, "hidden")) if n]
    return " and ".join(parts) + " failed"


def question_lines(results) -> list[str]:
    """One line per question: 'q4: 3/4, 1 hidden test failed' (or just 'q1: 3/3')."""
    lines = []
    for question in sorted(results.results, key=_natural):
        test_file = results.results[question]
        failed = [r for r in test_file.test_case_results if not r.passed]
        hidden = sum(r.test_case.hidden for r in failed)
        line = f"{question}: {test_file.score:g}/{test_file.possible:g}"
        lines.append(line + (f", {_failed_tests(len(failed) - hidden, hidden)}" if failed else ""))
    return lines


@dataclass
class CellError:
    """A cell of a submission that raised an error when the grader ran the notebook."""
    cell: int | None      # its position in the submitted notebook, counting every cell from 1
                          # (None: a cell the grader added)
    first_line: str
    error: str            # "ModuleNotFoundError: No module named 'seaborn'"

    def __str__(self) -> str:
        where = f"cell {self.cell}" if self.cell is not None else "a cell the grader added"
        return f'{where} ("{self.first_line}"): {self.error}' if self.first_line else f"{where}: {self.error}"


def _first_line(source: str, width: int = 60) -> str:
    line = next((l.strip() for l in source.splitlines() if l.strip()), "")
    return line if len(line) <= width else line[:width - 3] + "..."


def cell_errors(submitted, executed) -> list[CellError]:
    """Every cell of ``executed`` (otter's run of the notebook, which adds cells of its own)
    with an error output, located in ``submitted`` (the notebook as handed in) by its source."""
    code = [(i, _source(c)) for i, c in enumerate(submitted.cells) if c.cell_type == "code"]
    found, next_code = [], 0
    for cell in executed.cells:
        if cell.cell_type != "code":
            continue
        source = _source(cell)
        position = next((k for k in range(next_code, len(code)) if code[k][1] == source), None)
        if position is not None:
            next_code = position + 1
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(CellError(code[position][0] + 1 if position is not None else None,
                                       _first_line(source), f"{output.get('ename')}: {output.get('evalue')}"))
    return found


# ---------------------------------------------------------------------------------------------
# Grading hand-ins
# ---------------------------------------------------------------------------------------------
def submissions(paths) -> list[tuple[str, Path]]:
    """The notebooks to grade in ``paths`` (files, or folders searched for .ipynb files), each
    with its name: its path under the folder given (``alice/a1.ipynb``). With several paths,
    names are taken under the deepest folder that holds them all, so they never coincide."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise SystemExit(f"{path} does not exist")
        found = sorted(path.rglob("*.ipynb")) if path.is_dir() else [path]
        files += [f.resolve() for f in found if ".ipynb_checkpoints" not in f.parts]
    files = list(dict.fromkeys(files))                  # the same file named twice: once
    if not files:
        return []
    roots = [p.resolve() if p.is_dir() else p.resolve().parent for p in map(Path, paths)]
    base = Path(os.path.commonpath(roots))
    return [(f.relative_to(base).as_posix(), f) for f in files]


@dataclass
class Outcome:
    """One graded (or not graded) submission."""
    name: str                       # its path under the hand-ins folder
    results: object = None          # otter's GradingResults; None if not graded
    error: str = ""                 # why not: "timeout", "interrupted", otter's error
    detail: str = ""
    cell_errors: list = field(default_factory=list)
    seconds: float = 0.0

    def row(self, questions: list[str]) -> dict:
        row = {"submission": self.name, "error": self.error,
               "cell_errors": "; ".join(map(str, self.cell_errors))}
        if self.results is not None:
            row.update(scores(self.results), total=self.results.total, possible=self.results.possible)
        return row

    def line(self) -> str:
        """What the grading run prints for it."""
        if self.results is None:
            why = f" ({self.detail.strip().splitlines()[-1]})" if self.detail.strip() else ""
            again = (f"; Ctrl-C again within {DOUBLE_CTRL_C:g} s stops the run"
                     if self.error == "interrupted" else "")
            return f"NOT GRADED: {self.error}{why}  [{self.seconds:.1f} s]{again}"
        text = (f"{self.results.total:g} / {self.results.possible:g}  "
                + "  ".join(f"{q} {s:g}" for q, s in scores(self.results).items()))
        if self.cell_errors:
            text += f"  ({len(self.cell_errors)} cell{'s' if len(self.cell_errors) > 1 else ''} raised an error)"
        return text + f"  [{self.seconds:.1f} s]"

    def feedback(self, assignment: str, public_only: bool, timeout: float | None) -> str:
        """The text of the student's feedback file."""
        if self.results is None:
            return f"{assignment}: not graded ({self.name})\n\n{_why_not_graded(self.error, timeout)}\n"
        parts = [f"{assignment}: {self.results.total:g} / {self.results.possible:g} ({self.name})",
                 "\n".join(question_lines(self.results))]
        if self.cell_errors:
            parts.append("These cells raised an error when the notebook was run from the top (a cell\n"
                         "after one that failed may fail only because of it):\n"
                         + "\n".join(f"  {e}" for e in self.cell_errors))
        heading = ("Public tests (the hidden tests count in the points above but are not shown):"
                   if public_only else "Every test:")
        parts.append(heading + "\n\n" + self.results.summary(public_only=public_only))
        return "\n\n".join(parts) + "\n"


def _why_not_graded(error: str, timeout: float | None) -> str:
    if error == "timeout":
        return (f"The notebook was still running after {timeout:g} seconds, and was stopped. Look for a\n"
                "loop that never ends, or for work far beyond what the questions ask; then run the\n"
                "notebook from the top (Restart & Run All) and hand it in again.")
    if error == "interrupted":
        return "Grading was stopped by hand before the notebook finished."
    return f"The grader could not run it: {error}"


def grade_one(name: str, path: Path, autograder_zip: Path, timeout: float | None = DEFAULT_TIMEOUT) -> Outcome:
    """Grade one submission, never raising for a problem of the submission itself."""
    start = time.monotonic()
    try:
        results = grade(path, autograder_zip, timeout=timeout)
    except NotGraded as error:
        return Outcome(name, error=str(error), detail=error.detail, seconds=time.monotonic() - start)
    submitted = nbformat.read(str(path), as_version=4)
    return Outcome(name, results, cell_errors=cell_errors(submitted, results.notebook),
                   seconds=time.monotonic() - start)


class _ScoresCsv:
    """The CSV of scores, one row written (and flushed) as each submission finishes."""

    def __init__(self, path: str | None, questions: list[str]):
        self.handle = open(path, "w", newline="") if path else None
        if self.handle:
            self.writer = csv.DictWriter(self.handle, ["submission", *questions, "total", "possible",
                                                       "error", "cell_errors"])
            self.writer.writeheader()
            self.handle.flush()

    def add(self, row: dict) -> None:
        if self.handle:
            self.writer.writerow(row)
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()


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
    if args.timeout < 0:
        raise SystemExit(f"--timeout must be 0 (no limit) or a number of seconds, got {args.timeout:g}")
    todo = submissions(args.submissions)
    if not todo:
        raise SystemExit("no .ipynb submissions found")
    timeout = args.timeout or None
    print(f"grading {len(todo)} submission{'s' if len(todo) > 1 else ''} of {master.stem}, at most "
          f"{f'{timeout:g} s' if timeout else 'unlimited time'} each (Ctrl-C skips one, twice quickly stops)",
          flush=True)
    questions = questions_of(zip_path)
    table = _ScoresCsv(args.csv, questions)
    try:
        with skip_on_ctrl_c() as ctrl_c:
            for number, (name, path) in enumerate(todo, 1):
                print(f"[{number}/{len(todo)}] {name}: ", end="", flush=True)
                outcome = grade_one(name, path, zip_path, timeout)
                print(outcome.line(), flush=True)
                table.add(outcome.row(questions))
                if args.feedback:
                    target = Path(args.feedback) / Path(name).with_suffix(".txt")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(outcome.feedback(master.stem, args.public_only, timeout))
                if outcome.error == "interrupted" and ctrl_c.wait_for_a_second_press():
                    print(f"stopped by Ctrl-C after {number} of {len(todo)} submissions"
                          + (f"; their rows are in {args.csv}" if args.csv else ""), file=sys.stderr)
                    raise SystemExit(130)
    finally:
        table.close()
    if args.csv:
        print(f"scores written to {args.csv}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", default=str(DIST), help="output folder (default: assignments/dist)")
    if argv[:1] == ["grade"]:
        parser.add_argument("assignment", help="assignment name or prefix, e.g. a1")
        parser.add_argument("submissions", nargs="+", help="submitted .ipynb files, or folders of them")
        parser.add_argument("--csv", help="write the scores per question to this CSV file, a row per "
                                          "submission as it finishes")
        parser.add_argument("--feedback", help="write one feedback file per submission into this folder "
                                               "(named by its path under the folder graded: alice/a1.txt)")
        parser.add_argument("--public-only", action="store_true",
                            help="feedback files show the public tests' results only (the scores count all)")
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                            help=f"seconds a submission may run before it is stopped and marked 'timeout' "
                                 f"(default {DEFAULT_TIMEOUT:g}; 0: no limit)")
        _cmd_grade(parser.parse_args(argv[1:]))
    else:
        parser.add_argument("names", nargs="*", help="assignments to build (names or prefixes; default: all)")
        parser.add_argument("--no-check", action="store_true", help="do not grade the solutions")
        _cmd_build(parser.parse_args(argv))


if __name__ == "__main__":
    main()
