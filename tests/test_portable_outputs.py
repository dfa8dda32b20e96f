"""The outputs nbval compares print no rounding residue, so they pass on any CPU (issue #14).

nbval reruns every chapter and compares each cell's text output with the committed one,
character for character. A number that is nothing but rounding error (the difference of two
expressions that are equal in exact arithmetic, the distance of a distribution to itself, the
largest error of a float64 identity) is decided by the CPU's vector width, the BLAS and LAPACK
kernels, the number of threads and the order of a reduction. Printed, it differs from machine
to machine: chapter 7 printed `d(a, b) - d(b, a) = 0.0e+00` on one machine and `7.1e-15` on
another (a 2-core AVX2 EPYC), and `make test` failed wherever the committed output was not the
local one. A compared cell prints the check's verdict instead (`symmetric to 1e-9: True`), or a
value rounded to what the check needs.

Two symptoms are looked for in the committed notebooks (JSON only, no kernel: well under a
second):

1. In a compared text output, a number in exponent form whose magnitude is below 1e-9, zero
   included (`0.0e+00`, `-0.00e+00`): a value that small is rounding residue, or an exact zero
   that another summation order turns into residue. A tolerance the cell states is flagged
   too ("(to 1e-12)"): a reader, or a checker, cannot tell it from a computed value; write it
   in words ("to 12 digits") or as a power ("10^-12"). A negative zero in fixed-point form (`-0.0000`) is
   flagged too: it prints the sign of a residue, which another CPU may round the other way.
2. In a compared cell's source, a replacement field that formats a difference in exponent form
   (`{abs(a - b):.1e}`, `{(x - y).abs().max():.3e}`): its digits are those of the rounding
   error, more than any check carries, whatever their size on this machine.

Cells that nbval does not compare (tags nbval-ignore-output and nbval-skip, or the NBVAL_
comments) are left out, decided by nbval's own functions; outputs are sanitized with
tests/nbval_sanitize.cfg first, as nbval sanitizes them before comparing.
"""
import json
import re
from pathlib import Path

import pytest
from nbval.plugin import find_comment_markers, find_metadata_tags, get_sanitize_patterns

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
SANITIZE = get_sanitize_patterns((ROOT / "tests" / "nbval_sanitize.cfg").read_text())

RESIDUE_BELOW = 1e-9
# a decimal number in exponent form, not part of a word, a hex literal or a longer number
EXPONENT_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+(?![\w.])")
# a negative zero written without exponent: -0, -0.0, -0.0000
NEGATIVE_ZERO = re.compile(r"(?<![\w.])-0(?:\.0*)?(?![\w.])")
# a replacement field {expression:spec} of an f-string or str.format with an exponent format
EXPONENT_FIELD = re.compile(r"\{([^{}:!]+)(?:![rsa])?:[^{}]*[eE]\}")
DIFFERENCE = re.compile(r"\babs\(|\.abs\(\)|\S\s+-\s+\S")
SUBSCRIPT = re.compile(r"\[[^\[\]]*\]")
# nbval does not compare the image data (nbdime off) nor the widget model ids
NOT_COMPARED_DATA = ("image/png", "image/jpeg", "application/vnd.jupyter.widget-view+json")


def compared_cells(nb_path):
    """(nbval's cell index, cell) for every code cell whose outputs nbval compares."""
    nb = json.loads(nb_path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for index, cell in enumerate(code):
        source = "".join(cell["source"])
        options = dict(find_metadata_tags(cell.get("metadata", {})))
        options.update(find_comment_markers(source))
        if options.get("skip") or not options.get("check", True) or cell.get("execution_count") is None:
            continue
        yield index, cell


def compared_texts(cell):
    """The texts nbval compares, streams merged by name as nbval merges them, sanitized."""
    streams, texts = {}, []
    for out in cell.get("outputs", []):
        kind = out["output_type"]
        if kind == "stream":
            streams[out["name"]] = streams.get(out["name"], "") + "".join(out["text"])
        elif kind in ("execute_result", "display_data"):
            for mime, value in out.get("data", {}).items():
                if mime not in NOT_COMPARED_DATA:
                    texts.append(value if isinstance(value, str) else
                                 "".join(value) if isinstance(value, list) else json.dumps(value))
        elif kind == "error":
            texts.append(f"{out['ename']}: {out['evalue']}")
    texts = list(streams.values()) + texts
    for regex, replace in SANITIZE:
        texts = [re.sub(regex, replace, text) for text in texts]
    return texts


def residue_in_text(text):
    """The lines of `text` that print a number in exponent form below 1e-9 (zero included), or
    a negative zero."""
    found = []
    for line in text.splitlines():
        tokens = [tok for tok in EXPONENT_NUMBER.findall(line) if abs(float(tok)) < RESIDUE_BELOW]
        tokens += NEGATIVE_ZERO.findall(line)
        if tokens:
            found.append(f"{', '.join(tokens)} in: {line.strip()}")
    return found


def without_subscripts(expression):
    """`expression` with its [...] subscripts removed: `betas[T - 1]` indexes, it subtracts no floats."""
    while SUBSCRIPT.search(expression):
        expression = SUBSCRIPT.sub("", expression)
    return expression


def differences_in_exponent_form(source):
    """The replacement fields of `source` that format a difference in exponent form."""
    return [m.group(0) for m in EXPONENT_FIELD.finditer(source)
            if DIFFERENCE.search(without_subscripts(m.group(1)))]


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_compared_outputs_print_no_rounding_residue(nb_path):
    cells = list(compared_cells(nb_path))
    assert cells, f"{nb_path.name}: nbval compares no cell (is the notebook saved with its outputs?)"
    problems = []
    for index, cell in cells:
        source = "".join(cell["source"])
        for text in compared_texts(cell):
            problems += [f"{nb_path.name} cell {index}: prints {hit}" for hit in residue_in_text(text)]
        problems += [f"{nb_path.name} cell {index}: formats a difference in exponent form: {field}"
                     for field in differences_in_exponent_form(source)]
    assert not problems, ("rounding residue in outputs that nbval compares: it differs between CPUs. "
                          "Print the check's verdict or round to what the check needs, or tag the cell "
                          "nbval-ignore-output if its output is not meant to be compared:\n"
                          + "\n".join(problems))


@pytest.mark.parametrize("line, flagged", [
    ("symmetric: d(a, b) - d(b, a) = 7.1e-15; distance to itself: 0.0e+00", ["7.1e-15", "0.0e+00"]),
    ("max error -0.00e+00", ["-0.00e+00"]),
    ("gap 3E-12 and 1e-300", ["3E-12", "1e-300"]),
    ("agree (to 1e-12): True", ["1e-12"]),            # a stated tolerance reads like a residue
    ("agree (to 12 digits): True", []),
    ("alpha_bar_T = 2.42877e-09, beta = 4.04e-05, 1.0004e-09", []),
    ("seed 0x1e5, step 2e-3, version 1.2e-10b", []),
    ("target mean -0.0000, then -0.0, -0 and -0.0e+00", ["-0.0e+00", "-0.0000", "-0.0", "-0"]),
    ("log SNR -0.02, t = 0 -> 1, x in [-0.5, 0.5], range 10-0", []),
])
def test_the_residue_detector(line, flagged):
    hits = residue_in_text(line)
    assert [tok for hit in hits for tok in hit.split(" in: ")[0].split(", ")] == flagged


@pytest.mark.parametrize("source, flagged", [
    ('print(f"symmetric: {abs(fd_ab - fd_ba):.1e}")', True),
    ('print(f"max |diff| {(a - b).abs().max().item():.3e}")', True),
    ('print("{:.2E}".format(x - y))', False),                # positional fields are not parsed
    ('print(f"beta_tilde = {var.item():.6e}, step {sched.betas[T - 1].item():.6g}")', False),
    ('print(f"lambda = {lam[k - 1].item():.6e}, gap {(x[i] - y[i - 1]).item():.2e}")', True),
    ('print(f"max |diff| < 1e-12: {(a - b).abs().max().item() < 1e-12}")', False),
])
def test_the_difference_detector(source, flagged):
    assert bool(differences_in_exponent_form(source)) == flagged
