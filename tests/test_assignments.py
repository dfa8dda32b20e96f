"""The coursework (assignments/). For every master notebook, build the student version and the
grading bundle with otter-grader, as `python scripts/make_assignments.py` does, and check that

* the master passes all its tests, hidden ones included;
* the master's solutions put back into the student notebook (a filled-in student notebook)
  get full marks from the grader;
* the student version, as handed out, runs top to bottom without an error (with otter in its
  Colab mode), gets zero, and the grader says per question what is missing;
* its public tests, which the student runs with `grader.check`, fail on the empty answers
  and pass on the solutions;
* no solution line and no hidden test is in the student version;
* the tests give partial credit: a typical mistake in one question costs part of its points.

The grader runs notebooks in fresh kernels (otter run, no Docker): two per assignment, which
is most of the time this file takes. Everything else runs in-process.
"""
import contextlib
import importlib.util
import json
import re
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

import ddpm_lib

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.skipif(sys.version_info < (3, 10), reason="otter-grader needs Python 3.10 or newer"),
    # noise from otter-grader 7.0.0's own code, not ours
    pytest.mark.filterwarnings("ignore:The inplace keyword:Warning"),
    pytest.mark.filterwarnings("ignore:Traits should be given as instances:DeprecationWarning"),
]

_spec = importlib.util.spec_from_file_location("make_assignments", ROOT / "scripts" / "make_assignments.py")
make = importlib.util.module_from_spec(_spec)
sys.modules["make_assignments"] = make
_spec.loader.exec_module(make)

NAMES = [m.stem for m in make.masters()]
URL = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")

# For each assignment, a typical mistake in one question and the points it should still earn.
PARTIAL = {
    "a1_forward_and_posterior": ("q3", 3, '''
        def posterior_mean(x0, x_t, beta, alpha_bar, alpha_bar_prev):
            alpha = 1.0 - beta
            return (torch.sqrt(alpha_bar_prev) * beta * x0 + torch.sqrt(alpha) * (1.0 - alpha_bar_prev) * x_t) / (1.0 - alpha_bar)


        def posterior_variance(beta, alpha_bar, alpha_bar_prev):
            return (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)          # forgets the factor beta
    '''),
    "a2_training_and_sampling": ("q4", 3, '''
        def ddpm_step(x_t, t, eps_pred, betas, alpha_bars, z):
            beta, alpha_bar = betas[t], alpha_bars[t]
            mean = (x_t - beta / torch.sqrt(1 - alpha_bar) * eps_pred) / torch.sqrt(1 - beta)
            return mean + torch.sqrt(beta) * z                            # adds noise at t = 0 too
    '''),
    "a3_fast_sampling_and_guidance": ("q1", 2, '''
        def ddim_timesteps(T, steps):
            grid = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
            return [int(v) for v in grid.flip(0)]                        # wrong for steps = 1
    '''),
}


def test_every_assignment_has_a_partial_credit_case():
    assert NAMES, "no master notebooks in assignments/"
    assert set(PARTIAL) == set(NAMES)


@pytest.fixture(scope="module", params=NAMES)
def built(request, tmp_path_factory):
    """Build one assignment and grade its filled-in student notebook (the answer key), exactly
    as `python scripts/make_assignments.py` does."""
    return make.build(make.ASSIGNMENTS / f"{request.param}.ipynb", tmp_path_factory.mktemp("dist"), check=True)


def _read(path):
    return nbformat.read(str(path), as_version=4)


def _questions(nb):
    return sorted(set(make.question_of_cells(nb).values()))


@contextlib.contextmanager
def _one_thread():
    """Small tensors: one thread is fastest, and does not contend with a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_cells(nb, skip_until):
    """Execute a notebook's code cells in-process (no kernel), after cell ``skip_until`` (the
    grader cell; the setup cell before it pip-installs in Colab), without the grader's cells and
    (in a master) the test cells: the caller runs the tests, as the grader has them."""
    env = {}
    with _one_thread():
        for i, cell in enumerate(nb.cells):
            if (cell.cell_type == "code" and i > skip_until and not cell.source.startswith("grader.")
                    and "# BEGIN TEST CONFIG" not in cell.source):
                exec(compile(cell.source, f"cell {i}", "exec"), env)
    return env


def _run_test_files(files: dict, env, folder: Path):
    """Run otter test files (name -> source) with otter's runner against ``env``."""
    from otter.nbmeta_config import NBMetadataConfig
    from otter.test_files import create_test_file
    results = {}
    with _one_thread():
        for name, source in files.items():
            path = folder / f"{name}.py"
            path.write_text(source)
            test_file = create_test_file(str(path), NBMetadataConfig())
            test_file.run(env)
            results[name] = test_file
    return results


def _bundle_tests(built):
    with zipfile.ZipFile(built.autograder_zip) as bundle:
        return {Path(n).stem: bundle.read(n).decode() for n in bundle.namelist()
                if n.startswith("tests/") and n.endswith(".py")}


def _cases(test_source):
    """(name, hidden) of each test case in an otter test file."""
    return re.findall(r"@test_case\(points=[\d.]+, hidden=(True|False).*?\ndef (\w+)\(", test_source, flags=re.S)


# ---------------------------------------------------------------------------------------------
def test_the_master_passes_all_its_tests(built, tmp_path):
    master = _read(built.master)
    env = _run_cells(master, make._grader_cell_index(master))
    results = _run_test_files(_bundle_tests(built), env, tmp_path)
    assert sorted(results) == _questions(_read(built.student))
    for question, result in results.items():
        assert result.possible > 0 and result.score == result.possible, result.summary()


def test_a_filled_in_student_notebook_gets_full_marks(built):
    results = built.master_results     # graded by make.build: the student notebook + the solutions
    assert results.possible > 0 and results.total == results.possible, results.summary()
    assert sorted(results.results) == _questions(_read(built.student))
    for result in results.results.values():
        assert result.score == result.possible > 0, result.summary()


def test_the_student_version_runs_gets_zero_and_says_what_is_missing(built, tmp_path):
    """Grade the student notebook as handed out, in debug mode (an error in any cell fails the
    test), with otter believing it runs in Colab (there it insists on test files, which the
    notebook writes itself)."""
    nb = _read(built.student)
    colab = nbformat.v4.new_code_cell('from otter.check.utils import IPythonInterpreter\n'
                                      'IPythonInterpreter.COLAB.value.check_strs.append("ipykernel")')
    nb.cells.insert(make._grader_cell_index(nb), colab)   # after the setup cell, whose Colab branch pip-installs
    submission = tmp_path / built.student.name
    nbformat.write(nb, str(submission))
    results = make.grade(submission, built.autograder_zip, debug=True)
    assert results.possible == built.master_results.possible
    assert results.total == 0, results.summary()
    for question, result in results.results.items():
        summary = result.summary()
        assert result.score == 0
        assert "NotImplementedError" in summary and f"Question {question[1:]}:" in summary, summary
    # what the student saw under each question
    checks = {}
    for cell in results.notebook.cells:
        match = make._CHECK.match(cell.source.strip()) if cell.cell_type == "code" else None
        if match:
            checks[match.group(1)] = "".join(o.get("data", {}).get("text/plain", "") for o in cell.outputs)
    assert sorted(checks) == _questions(nb)
    for question, output in checks.items():
        assert f"{question} results:" in output and "Test case failed" in output and "NotImplementedError" in output, output


def test_the_public_tests_fail_on_empty_answers_and_pass_on_the_solutions(built, tmp_path):
    student = _read(built.student)
    public = make.public_tests_of(student)
    bundle = _bundle_tests(built)
    assert sorted(public) == sorted(bundle) == _questions(student)
    for question in bundle:   # the student gets exactly the bundle's public test cases
        assert _cases(public[question]) == [c for c in _cases(bundle[question]) if c[0] == "False"], question
        assert any(hidden == "True" for hidden, _ in _cases(bundle[question])), f"{question} has no hidden test"
    (tmp_path / "empty").mkdir()
    empty = _run_test_files(public, _run_cells(student, make._grader_cell_index(student)), tmp_path / "empty")
    for question, result in empty.items():
        assert result.score == 0 and "NotImplementedError" in result.summary(), result.summary()
    (tmp_path / "filled").mkdir()
    filled_nb = _read(built.solutions)
    filled = _run_test_files(public, _run_cells(filled_nb, make._grader_cell_index(filled_nb)), tmp_path / "filled")
    for question, result in filled.items():
        assert result.passed_all, result.summary()


def test_no_solution_and_no_hidden_test_in_the_student_version(built):
    master, student = _read(built.master), _read(built.student)
    assert len(make.solution_lines(master)) >= len(_questions(student)), "too few solution lines: is the master marked up?"
    assert make.leaked_solution_lines(built.master, student) == []
    text = json.dumps(student.cells) + "\n".join(make.public_tests_of(student).values())
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN PROMPT", "BEGIN TESTS", "hidden=True",
                   "ASSIGNMENT CONFIG", "TEST CONFIG"):
        assert marker not in text, f"{marker!r} is in the student version"
    hidden = [name for source in _bundle_tests(built).values() for h, name in _cases(source) if h == "True"]
    assert hidden
    for name in hidden:
        assert name not in text, f"hidden test {name} is in the student version"
    # each answer cell holds a clear prompt instead
    answers = [c for c in student.cells if make.ANSWER_TAG in c.metadata.get("tags", [])]
    assert answers and all("raise NotImplementedError(" in c.source and "YOUR CODE HERE" in c.source for c in answers)


def test_the_tests_give_partial_credit(built, tmp_path):
    """All solutions but one question's, which gets a typical mistake: the grader's tests
    (hidden ones included, run in-process with otter's runner) give the other questions full
    marks and that one part of its points."""
    question, expected, wrong = PARTIAL[built.name]
    answered = make.fill_in(_read(built.student), _read(built.autograder_zip.parent / f"{built.name}.ipynb"),
                            replace={question: wrong})
    results = _run_test_files(_bundle_tests(built), _run_cells(answered, make._grader_cell_index(answered)), tmp_path)
    scores = {q: r.score for q, r in results.items()}
    full = {q: r.possible for q, r in built.master_results.results.items()}
    assert 0 < expected < full[question]
    assert scores == {**full, question: expected}, scores


def test_the_student_version_starts_with_the_books_setup_cell(built):
    code = [c for c in _read(built.student).cells if c.cell_type == "code"]
    assert code[0].source == (
        "# Setup: where ddpm_lib or otter-grader (which checks your answers) is missing\n"
        "# (Colab, Kaggle, Binder), install them; ddpm_lib is pinned to the book's\n"
        "# release and torch is kept. If pip then asks you to restart the runtime, do\n"
        "# so and run this cell again.\n"
        f'REPO = "git+{URL}@v{ddpm_lib.__version__}"\n'
        "try:\n"
        "    import ddpm_lib, otter\n"
        "except ImportError:\n"
        '    %pip install "ddpm_lib @ {REPO}" "otter-grader==7.0.0"\n'
        "from ddpm_lib import book\n"
        "cfg = book.setup()")
    # the otter-grader the setup cell installs in Colab is the one the book's requirements pin
    assert re.search(r"^otter-grader==7\.0\.0\s*(;|#|$)", (ROOT / "requirements.txt").read_text(), flags=re.M), \
        "requirements.txt must pin otter-grader==7.0.0, as the assignments' setup cell does"
