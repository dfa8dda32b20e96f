"""Claims of Chapter 3 that rest on ddpm_lib and on a stored result, checked without the notebook.

The chapter checks the score relation and Tweedie's formula on one-pixel data; here the score
relation is checked in two dimensions, where each coordinate of the gradient is a different
finite difference. The likelihood section quotes ddpm_lib/results/nll_bound_cpu.json in its prose; if the
file is measured again, the test says which sentence went stale.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from ddpm_lib import NoiseSchedule, analytic, likelihood
from ddpm_lib.likelihood import _strata_edges
from ddpm_lib.pretrained import PRETRAINED

ROOT = Path(__file__).resolve().parents[1]
RESULT = json.loads((ROOT / "ddpm_lib" / "results" / "nll_bound_cpu.json").read_text())


def chapter_prose():
    nb = json.loads((ROOT / "chapters" / "03_mathematics.ipynb").read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


@pytest.mark.parametrize("k", [0, 9, 99, 499, 999])
def test_noise_predictor_is_the_scaled_score_in_two_dimensions(k):
    """grad log p_t(x) == -E[eps | x_t] / sqrt(1 - alpha_bar_t) for a 2-D Gaussian mixture."""
    schedule = NoiseSchedule.linear(1000)
    means = torch.tensor([[-0.7, 0.2], [0.4, -0.5], [0.6, 0.8]], dtype=torch.float64)
    stds = torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    eps_model = analytic.gaussian_mixture_eps_predictor(schedule, means, stds, weights)
    a = schedule.float64("alpha_bars")[k]

    def log_p(x):  # (B, 2) -> (B,): the exact density of the noised mixture
        var = a * stds ** 2 + 1 - a
        sq = ((x[:, None, :] - a.sqrt() * means) ** 2).sum(-1)
        return torch.logsumexp(weights.log() - math.log(2 * math.pi) - torch.log(var)
                               - 0.5 * sq / var, dim=1)

    x = torch.tensor([[-1.0, 0.3], [0.0, 0.0], [0.5, -0.4], [0.9, 1.1]], dtype=torch.float64)
    h = 1e-5
    score = torch.stack([(log_p(x + h * e) - log_p(x - h * e)) / (2 * h)
                         for e in torch.eye(2, dtype=torch.float64)], dim=1)
    eps = eps_model(x, torch.full((len(x),), k))
    assert torch.allclose(-eps / (1 - a).sqrt(), score, rtol=1e-6, atol=1e-6)


def test_decoder_bits_for_a_perfect_prediction():
    """sigma_1 = sqrt(beta_1) = 0.01: 1.713 bits for an interior value, 0.616 at either end."""
    sigma_1 = math.sqrt(NoiseSchedule.linear(1000).float64("betas")[0].item())
    values = torch.tensor([[-1.0, -1 + 2 / 255, 0.0 - 1 / 255, 1.0]], dtype=torch.float64)
    bits = -likelihood.discrete_gaussian_log_likelihood(values, values, sigma_1) / math.log(2)
    assert [f"{b:.3f}" for b in bits[0].tolist()] == ["0.616", "1.713", "1.713", "0.616"]


def test_stored_bound_belongs_to_the_shipped_model():
    assert RESULT["sha256"] == PRETRAINED[RESULT["model"]]["sha256"]
    assert RESULT["strata_edges"] == _strata_edges(1000, RESULT["strata"]).tolist()
    parts = RESULT["prior"] + RESULT["diffusion"] + RESULT["decoder"]
    assert math.isclose(parts, RESULT["bits_per_dim"], rel_tol=1e-9)


def test_chapter_prose_quotes_the_stored_bound():
    prose = chapter_prose()
    quoted = [
        f"{RESULT['bits_per_dim']:.2f} ± {RESULT['standard_error']:.2f} bits per dimension",
        f"The KL terms carry {RESULT['diffusion']:.2f} bits per pixel",
        f"first {RESULT['n_images']} test images",
        f"({RESULT['strata']} timesteps per image)",
        f"About {RESULT['decoder']:.1f} of the {RESULT['bits_per_dim']:.1f} bits per pixel",
    ]
    missing = [q for q in quoted if q not in " ".join(prose.split())]
    assert not missing, f"Chapter 3 no longer quotes ddpm_lib/results/nll_bound_cpu.json as: {missing}"
