"""The coursework (assignments/). For every master notebook, build the student version and the
grading bundle with otter-grader, as `python scripts/make_assignments.py` does, and check that

* the master passes all its tests, hidden ones included;
* the master's solutions put back into the student notebook (a filled-in student notebook)
  get full marks from the grader;
* the student version, as handed out, runs top to bottom without an error (with otter in its
  Colab mode), gets zero, and the grader says per question what is missing;
* its public tests, which the student runs with `grader.check`, fail on the empty answers
  and pass on the solutions, and every function a student writes has a public test (one left
  unwritten fails a public test of its question);
* no solution line and no hidden test is in the student version;
* the tests give partial credit: a typical mistake in one question costs part of its points;
* the masters are numbered in the book's reading order.

And that grading a class survives what a class hands in (`make_assignments.py grade`): an
endless loop is stopped at the time limit ("timeout"), Ctrl-C skips one hand-in
("interrupted") and twice stops the run, the CSV gets each row as its hand-in finishes, hand-ins
with the same file name in different folders get their own feedback files, and a cell that
raised is reported with a line per question in the feedback.

The grader runs notebooks in fresh kernels (otter run, no Docker): two per assignment and six
for the grading run, which is most of the time this file takes. Everything else runs
in-process.
"""
import contextlib
import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import ast

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

# For each assignment, typical mistakes, each in one question, and the points it should still earn.
PARTIAL = {
    "a1_forward_and_posterior": [
        ("the variance forgets the factor beta", "q3", 3, '''
            def posterior_mean(x0, x_t, beta, alpha_bar, alpha_bar_prev):
                alpha = 1.0 - beta
                return (torch.sqrt(alpha_bar_prev) * beta * x0 + torch.sqrt(alpha) * (1.0 - alpha_bar_prev) * x_t) / (1.0 - alpha_bar)


            def posterior_variance(beta, alpha_bar, alpha_bar_prev):
                return (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        '''),
        # the classic mistake: every test of the variance fails (the simulation at t = 10 too);
        # the two tests of the mean pass
        ("variance = beta", "q3", 2, '''
            def posterior_mean(x0, x_t, beta, alpha_bar, alpha_bar_prev):
                alpha = 1.0 - beta
                return (torch.sqrt(alpha_bar_prev) * beta * x0 + torch.sqrt(alpha) * (1.0 - alpha_bar_prev) * x_t) / (1.0 - alpha_bar)


            def posterior_variance(beta, alpha_bar, alpha_bar_prev):
                return beta
        '''),
    ],
    "a2_training_and_sampling": [
        ("noise added at t = 0 too", "q4", 3, '''
            def ddpm_step(x_t, t, eps_pred, betas, alpha_bars, z):
                beta, alpha_bar = betas[t], alpha_bars[t]
                mean = (x_t - beta / torch.sqrt(1 - alpha_bar) * eps_pred) / torch.sqrt(1 - beta)
                return mean + torch.sqrt(beta) * z
        '''),
    ],
    "a3_evaluating_samples": [
        ("the diagonal kept in the MMD estimate", "q3", 2, '''
            def polynomial_kernel(x, y):
                return (x @ y.T / x.shape[1] + 1.0) ** 3


            def mmd2_unbiased(x, y):
                return float(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
                             - 2 * polynomial_kernel(x, y).mean())
        '''),
        ("a point counted as its own nearest neighbour", "q4", 3, '''
            def knn_radii(feats, k):
                f = feats.double()
                return torch.cdist(f, f).sort(dim=1).values[:, k - 1]


            def precision_recall(real, fake, k=3):
                real, fake = real.double(), fake.double()
                in_real = (torch.cdist(fake, real) <= knn_radii(real, k)[None, :]).any(dim=1)
                in_fake = (torch.cdist(real, fake) <= knn_radii(fake, k)[None, :]).any(dim=1)
                return float(in_real.double().mean()), float(in_fake.double().mean())
        '''),
    ],
    "a4_fast_sampling_and_guidance": [
        ("wrong for steps = 1", "q1", 2, '''
            def ddim_timesteps(T, steps):
                grid = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
                return [int(v) for v in grid.flip(0)]
        '''),
    ],
    "a5_latent_diffusion": [
        ("the variance used as the standard deviation", "q2", 1, '''
            def sample_latent(mean, logvar, noise):
                return mean + torch.exp(logvar) * noise
        '''),
        ("the ELBO averaged over the batch", "q3", 2, '''
            def elbo(x, x_hat, mean, logvar, b):
                log_likelihood = (-math.log(2 * b) - (x - x_hat).abs() / b).sum() / x.shape[0]
                kl = kl_divergence(mean, logvar).sum() / x.shape[0]
                return (log_likelihood - kl).expand(x.shape[0])
        '''),
    ],
    "a6_scores_and_flows": [
        ("the score multiplied by sqrt(1 - alpha_bar) instead of divided", "q1", 2, '''
            def score_from_eps(eps, alpha_bar):
                return -eps * torch.sqrt(1 - alpha_bar)


            def gaussian_score(x_t, alpha_bar, mu, sigma_data):
                return -(x_t - torch.sqrt(alpha_bar) * mu) / (alpha_bar * sigma_data ** 2 + 1 - alpha_bar)
        '''),
        # only the test of the noise term passes: the drift is wrong at first order in beta
        ("the Euler-Maruyama drift with x_t instead of x_t / 2", "q2", 1, '''
            def euler_maruyama_step(x_t, eps_pred, alpha_bar, alpha_bar_prev, z):
                beta = 1 - alpha_bar / alpha_bar_prev
                return x_t + beta * (x_t - eps_pred / torch.sqrt(1 - alpha_bar)) + torch.sqrt(beta) * z
        '''),
        ("Heun without the final Euler step (the model called at t_prev = -1)", "q3", 2, '''
            def edm_sigma(alpha_bar):
                return torch.sqrt((1 - alpha_bar) / alpha_bar)


            def heun_step(x_t, t, t_prev, eps_pred, alpha_bars, model):
                alpha_bar = alpha_bars[t]
                alpha_bar_prev = alpha_bars[t_prev] if t_prev >= 0 else torch.ones((), dtype=alpha_bars.dtype)
                h = edm_sigma(alpha_bar_prev) - edm_sigma(alpha_bar)
                y = x_t / torch.sqrt(alpha_bar)
                y_euler = y + h * eps_pred
                eps_end = model(torch.sqrt(alpha_bar_prev) * y_euler, torch.full((x_t.shape[0],), t_prev))
                return torch.sqrt(alpha_bar_prev) * (y + h * (eps_pred + eps_end) / 2)
        '''),
        ("the velocity's sign flipped (target x0 - eps)", "q4", 2, '''
            def flow_matching_loss(model, x0, t, eps, T):
                s = ((t.float() + 1) / T).view(-1, 1, 1, 1)
                x_s = (1 - s) * x0 + s * eps
                return ((model(x_s, t) - (x0 - eps)) ** 2).mean()


            def gaussian_velocity(x, s, mu, sigma_data):
                var = (1 - s) ** 2 * sigma_data ** 2 + s ** 2
                return s * (x - (1 - s) * mu) / var - mu - (1 - s) * sigma_data ** 2 * (x - (1 - s) * mu) / var
        '''),
    ],
}


def test_every_assignment_has_a_partial_credit_case():
    assert NAMES, "no master notebooks in assignments/"
    assert set(PARTIAL) == set(NAMES)
    assert all(PARTIAL.values())


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


def _solutions_notebook(built):
    """otter's solutions notebook of an assignment (the master, as otter assign keeps it)."""
    return _read(built.autograder_zip.parent / f"{built.name}.ipynb")


def _bundle_tests(built):
    return _tests_in(built.autograder_zip)


def _tests_in(autograder_zip):
    """The test files of a grading bundle, hidden tests included: question -> source."""
    with zipfile.ZipFile(autograder_zip) as bundle:
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
    full = {q: r.possible for q, r in built.master_results.results.items()}
    tests = _bundle_tests(built)
    for number, (mistake, question, expected, wrong) in enumerate(PARTIAL[built.name]):
        answered = make.fill_in(_read(built.student), _solutions_notebook(built), replace={question: wrong})
        folder = tmp_path / str(number)
        folder.mkdir()
        results = _run_test_files(tests, _run_cells(answered, make._grader_cell_index(answered)), folder)
        scores = {q: r.score for q, r in results.items()}
        assert 0 < expected < full[question], mistake
        assert scores == {**full, question: expected}, f"{mistake}: {scores}"


def _answer_functions(student) -> dict[str, list[str]]:
    """For each question, the functions its answer cells define (what the student writes)."""
    owner = make.question_of_cells(student)
    functions = {}
    for i, question in owner.items():
        tree = ast.parse(student.cells[i].source)
        functions.setdefault(question, []).extend(n.name for n in tree.body if isinstance(n, ast.FunctionDef))
    return functions


def test_every_function_a_student_writes_has_a_public_test(built, tmp_path):
    """With the solutions in place but one function left unwritten (raising
    NotImplementedError, as in the student version), a public test of its question fails: so
    `grader.check` never says "All test cases passed!" over a missing answer (as it did for
    a1's x0_from_v and eps_from_v, which had no public test)."""
    student, filled = _read(built.student), _read(built.solutions)
    public = make.public_tests_of(student)
    env = _run_cells(filled, make._grader_cell_index(filled))
    functions = _answer_functions(student)
    assert sorted(functions) == _questions(student) and all(functions.values())
    untested = []
    for question, names in functions.items():
        for name in names:
            def unwritten(*args, _name=name, **kwargs):
                raise NotImplementedError(f"{_name} is not written yet")
            saved, env[name] = env[name], unwritten
            folder = tmp_path / name
            folder.mkdir()
            try:
                [result] = _run_test_files({question: public[question]}, env, folder).values()
            finally:
                env[name] = saved
            if result.passed_all:
                untested.append(f"{question}: {name}")
    assert not untested, f"no public test fails when these are unwritten: {untested}"


def test_the_masters_are_numbered_in_reading_order():
    """a1, a2, ... follow the chapters they build on (by the last chapter each follows), each
    title says its number and what the notebook needs, and the masters' README lists them."""
    chapters = []
    for number, name in enumerate(NAMES, 1):
        assert name.startswith(f"a{number}_"), NAMES
        nb = nbformat.read(str(make.ASSIGNMENTS / f"{name}.ipynb"), as_version=4)
        assert f"name: {name}\n" in nb.cells[0].source, f"{name}: its ASSIGNMENT CONFIG names another assignment"
        title = nb.cells[1].source
        assert title.startswith(f"# Assignment {number}: "), title.splitlines()[0]
        assert "**What you need:** a CPU" in title, f"{name} must say what it needs (a CPU)"
        follows = re.search(r"^\*Follows (.*?)\.\*", title, flags=re.M | re.S).group(1)
        chapters.append(max(int(n) for n in re.findall(r"(\d+)\s+\(", follows)))
        assert f"`{name}.ipynb`" in (make.ASSIGNMENTS / "README.md").read_text(), f"assignments/README.md lacks {name}"
    assert chapters == sorted(chapters), f"last chapters followed {chapters}: not in reading order"


def test_the_student_version_starts_with_the_books_setup_cell(built):
    """It installs what is missing, asks for a restart where pip wants one, and prints one
    line of its own instead of book.setup()'s summary, whose GPU warning (in Colab without a
    GPU) would contradict the assignment: a CPU is enough."""
    code = [c for c in _read(built.student).cells if c.cell_type == "code"]
    assert code[0].source == (
        "# Setup: where ddpm_lib or otter-grader (which checks your answers) is missing\n"
        "# (Colab, Kaggle, Binder), install them; ddpm_lib is pinned to the book's\n"
        "# release and torch is kept. If pip then asks you to restart the runtime, do\n"
        "# so and run this cell again. A CPU is enough: this notebook needs no GPU.\n"
        f'REPO = "git+{URL}@v{ddpm_lib.__version__}"\n'
        "try:\n"
        "    import ddpm_lib, otter\n"
        "except ImportError:\n"
        '    %pip install "ddpm_lib @ {REPO}" "otter-grader==7.0.0"\n'
        "    import ddpm_lib, otter\n"
        "from ddpm_lib import book\n"
        "cfg = book.setup(quiet=True)  # seeds the random number generators\n"
        'print(f"ddpm_lib {ddpm_lib.__version__} and otter-grader {otter.__version__} are ready; '
        'a CPU is all this needs")')
    # the otter-grader the setup cell installs in Colab is the one the book's requirements pin
    assert re.search(r"^otter-grader==7\.0\.0\s*(;|#|$)", (ROOT / "requirements.txt").read_text(), flags=re.M), \
        "requirements.txt must pin otter-grader==7.0.0, as the assignments' setup cell does"


def test_the_setup_cell_prints_no_gpu_warning_in_colab_without_a_gpu(built, monkeypatch, capsys):
    """Run the setup cell's last lines as Colab on a CPU would: one line, no warning."""
    from ddpm_lib import book
    monkeypatch.setattr(book, "in_colab", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    source = [c for c in _read(built.student).cells if c.cell_type == "code"][0].source
    after_install = source[source.index("from ddpm_lib import book"):]
    with _one_thread():
        exec(after_install, {"ddpm_lib": ddpm_lib, "otter": pytest.importorskip("otter")})
    printed = capsys.readouterr().out
    assert "WARNING" not in printed and "GPU" not in printed, printed
    assert printed.count("\n") == 1 and "a CPU is all this needs" in printed, printed


# ---------------------------------------------------------------------------------------------
# Grading a class: `python scripts/make_assignments.py grade ...`
# ---------------------------------------------------------------------------------------------
A1 = "a1_forward_and_posterior"
TIME_LIMIT = 30        # s per hand-in in these runs; a completed a1 is graded in 5 to 15 s here
MISSING = "a_package_that_is_not_installed"


@pytest.fixture(scope="module")
def a1_dist(tmp_path_factory):
    """a1's student version, answer key and bundle, built without grading the answer key."""
    dist = tmp_path_factory.mktemp("a1_dist")
    make.build(make.ASSIGNMENTS / f"{A1}.ipynb", dist, check=False)
    return dist


def _hand_in(folder: Path, who: str, nb) -> Path:
    path = folder / who / f"{A1}.ipynb"       # the same file name for everyone, as from Colab
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def _endless_loop(answer_key, pid_file: Path):
    """The answer key with a last cell that writes its kernel's pid, then never ends."""
    nb = nbformat.from_dict(json.loads(json.dumps(answer_key)))
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import os, pathlib\npathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\nwhile True:\n    pass"))
    return nb


def _with_raising_cells(answer_key):
    """The answer key with a cell importing a package that is not installed, and the same import
    first in the cell that imports torch (so torch is never imported: the answers then fail
    with NameError). Returns the notebook and the two cells' positions, counted from 1."""
    nb = nbformat.from_dict(json.loads(json.dumps(answer_key)))
    imports = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.startswith("import torch"))
    nb.cells[imports].source = f"import {MISSING}\n" + nb.cells[imports].source
    nb.cells.insert(imports, nbformat.v4.new_code_cell(f"import {MISSING} as helper"))
    return nb, (imports + 1, imports + 2)


def _start_grading(hand_ins: Path, out: Path, dist: Path, timeout=TIME_LIMIT) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "scripts" / "make_assignments.py"), "grade", "a1", str(hand_ins),
               "--dist", str(dist), "--csv", str(out / "a1.csv"), "--feedback", str(out / "feedback"),
               "--public-only", "--timeout", str(timeout)]
    return subprocess.Popen(command, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"grading ended before {path.name} appeared:\n{process.communicate()}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {seconds} s"
        time.sleep(0.2)


def _csv_rows(path: Path) -> dict:
    with open(path, newline="") as handle:
        return {row["submission"]: row for row in csv.DictReader(handle)}


def _gone(pid: int, seconds: float = 10) -> bool:
    """Whether process ``pid`` has ended (within ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(os.name == "nt", reason="sends SIGINT as Ctrl-C does on POSIX")
def test_grading_a_class_survives_an_endless_loop_ctrl_c_and_raising_cells(a1_dist, tmp_path):
    """Four hand-ins, all named a1_forward_and_posterior.ipynb, one folder per student:
    alice (the answer key), ben (an endless loop, stopped with Ctrl-C), bob (the answer key
    with cells that raise), carl (an endless loop, stopped at the time limit)."""
    key = _read(a1_dist / A1 / "solutions" / f"{A1}.ipynb")
    hand_ins, out = tmp_path / "hand-ins", tmp_path / "out"
    out.mkdir()
    _hand_in(hand_ins, "alice", key)
    _hand_in(hand_ins, "ben", _endless_loop(key, tmp_path / "ben.pid"))
    bob, raising = _with_raising_cells(key)
    _hand_in(hand_ins, "bob", bob)
    _hand_in(hand_ins, "carl", _endless_loop(key, tmp_path / "carl.pid"))

    grading = _start_grading(hand_ins, out, a1_dist)
    try:
        _wait_for(tmp_path / "ben.pid", grading)             # ben's notebook is in its endless loop
        rows = _csv_rows(out / "a1.csv")                     # written as each hand-in finishes:
        assert list(rows) == [f"alice/{A1}.ipynb"]           # alice's row is there already
        grading.send_signal(signal.SIGINT)                   # Ctrl-C: skip ben, go on
        stdout, stderr = grading.communicate(timeout=TIME_LIMIT + 240)
    finally:
        if grading.poll() is None:
            grading.kill()
    assert grading.returncode == 0, stdout + stderr

    # the CSV: a row per hand-in, named by its path under hand-ins/
    rows = _csv_rows(out / "a1.csv")
    assert list(rows) == [f"{who}/{A1}.ipynb" for who in ("alice", "ben", "bob", "carl")], rows
    alice, ben, bob_row, carl = rows.values()
    assert (alice["total"], alice["possible"], alice["error"], alice["cell_errors"]) == ("17", "17", "", "")
    assert ben["error"] == "interrupted" and ben["total"] == ""
    assert carl["error"] == "timeout" and carl["total"] == ""
    assert bob_row["error"] == "" and 0 <= float(bob_row["total"]) < 17
    assert bob_row["cell_errors"] == "; ".join(
        f'cell {n} ("{source}"): ModuleNotFoundError: No module named \'{MISSING}\''
        for n, source in zip(raising, (f"import {MISSING} as helper", f"import {MISSING}"))), bob_row["cell_errors"]

    # carl was stopped at the time limit, not long after; the kernels of both loops are gone
    carl_line = next(line for line in stdout.splitlines() if line.startswith("[4/4] carl/"))
    seconds = float(re.search(r"\[([\d.]+) s\]", carl_line).group(1))
    assert "NOT GRADED: timeout" in carl_line and TIME_LIMIT <= seconds < TIME_LIMIT + 10, carl_line
    for who in ("ben", "carl"):
        assert _gone(int((tmp_path / f"{who}.pid").read_text())), f"{who}'s kernel is still running"

    # a feedback file per hand-in, named by its path: alice's and bob's do not overwrite each other
    feedback = out / "feedback"
    assert sorted(p.relative_to(feedback).as_posix() for p in feedback.rglob("*.txt")) == [
        f"{who}/{A1}.txt" for who in ("alice", "ben", "bob", "carl")]
    alice_text, bob_text = ((feedback / who / f"{A1}.txt").read_text() for who in ("alice", "bob"))
    assert alice_text.startswith(f"{A1}: 17 / 17 (alice/{A1}.ipynb)")
    assert ["q1: 3/3", "q2: 4/4", "q3: 5/5", "q4: 5/5"] == [l for l in alice_text.splitlines() if re.match(r"q\d: ", l)]
    assert bob_text.startswith(f"{A1}: {bob_row['total']} / 17 (bob/{A1}.ipynb)")
    lines = [l for l in bob_text.splitlines() if re.match(r"q\d: ", l)]
    assert len(lines) == 4 and all(re.fullmatch(r"q\d: \d+/\d+(, \d+ public tests? (and \d+ hidden tests? )?failed"
                                                 r"|, \d+ hidden tests? failed)?", l) for l in lines), lines
    for n in raising:
        assert f"cell {n} (" in bob_text and f"No module named '{MISSING}'" in bob_text
    assert "NameError" in bob_text                           # what the missing import did later
    bundle = a1_dist / A1 / "autograder" / f"{A1}-autograder.zip"
    hidden = [name for source in _tests_in(bundle).values() for h, name in _cases(source) if h == "True"]
    assert hidden and not any(name in bob_text for name in hidden)    # --public-only: no hidden test shown
    assert "still running after" in (feedback / "carl" / f"{A1}.txt").read_text()
    assert "stopped by hand" in (feedback / "ben" / f"{A1}.txt").read_text()


@pytest.mark.skipif(os.name == "nt", reason="sends SIGINT as Ctrl-C does on POSIX")
def test_ctrl_c_twice_stops_the_run_and_keeps_the_rows(a1_dist, tmp_path):
    key = _read(a1_dist / A1 / "solutions" / f"{A1}.ipynb")
    hand_ins, out = tmp_path / "hand-ins", tmp_path / "out"
    out.mkdir()
    _hand_in(hand_ins, "ben", _endless_loop(key, tmp_path / "ben.pid"))
    _hand_in(hand_ins, "bob", key)
    grading = _start_grading(hand_ins, out, a1_dist, timeout=0)     # no time limit
    try:
        _wait_for(tmp_path / "ben.pid", grading)
        grading.send_signal(signal.SIGINT)
        time.sleep(0.3)
        grading.send_signal(signal.SIGINT)
        stdout, stderr = grading.communicate(timeout=60)
    finally:
        if grading.poll() is None:
            grading.kill()
    assert grading.returncode == 130, stdout + stderr
    assert "stopped by Ctrl-C after 1 of 2 submissions" in stderr
    rows = _csv_rows(out / "a1.csv")
    assert list(rows) == [f"ben/{A1}.ipynb"] and rows[f"ben/{A1}.ipynb"]["error"] == "interrupted"
    assert _gone(int((tmp_path / "ben.pid").read_text()))


def test_submission_names_are_paths_under_the_folder_given(tmp_path):
    for who in ("alice", "bob"):
        (tmp_path / "hand-ins" / who).mkdir(parents=True)
        (tmp_path / "hand-ins" / who / "a1.ipynb").write_text("{}")
    (tmp_path / "hand-ins" / "alice" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "hand-ins" / "alice" / ".ipynb_checkpoints" / "a1-checkpoint.ipynb").write_text("{}")
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "a1.ipynb").write_text("{}")
    names = lambda *paths: [name for name, _ in make.submissions([tmp_path / p for p in paths])]
    assert names("hand-ins") == ["alice/a1.ipynb", "bob/a1.ipynb"]
    assert names("hand-ins/alice/a1.ipynb") == ["a1.ipynb"]
    assert names("hand-ins", "late/a1.ipynb") == ["hand-ins/alice/a1.ipynb", "hand-ins/bob/a1.ipynb", "late/a1.ipynb"]
    assert names("hand-ins/alice/a1.ipynb", "hand-ins/bob/a1.ipynb") == ["alice/a1.ipynb", "bob/a1.ipynb"]

