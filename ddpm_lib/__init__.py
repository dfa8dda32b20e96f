"""ddpm_lib: the small library behind the DDPM book.

One module per idea, in the order data flows; no module imports a later one
(tests/test_package_structure.py reads the import graph from the source and checks it):
``checks`` and ``io`` (value checks, atomic files) -> ``data`` -> ``diffusion`` (the
equations) -> ``schedules`` (NoiseSchedule) -> ``analytic`` (exact noise predictors for toy
data) and ``likelihood`` (the bound in bits per dimension) -> ``unet`` -> ``accel``
(precision, compile, processes), ``runs`` (generators, optimiser step, loss log, checkpoint
checks) and ``ema`` -> ``autoencoder`` (the VAE and its training) -> ``pretrained`` (shipped
weights) -> ``train`` -> ``guidance`` and ``samplers`` -> ``sde`` (the continuous view:
reverse-SDE and probability-flow ODE samplers, which it adds to ``samplers.SAMPLERS``)
-> ``features`` (images to features) -> ``metrics`` (the scores) -> ``recipes`` (training
recipes as data, runs for a time budget and their scores) -> ``viz``; then ``book``
(a chapter's first cell), ``bench`` (speed) and ``python -m ddpm_lib`` (train and sample
from the command line). Importing the package imports ``sde``, so the sampler registry is
complete whichever module is imported first.
"""
__version__ = "0.4.0"

from . import sde  # noqa: F401  (registers euler_maruyama, euler, heun and spacing "edm")
from .schedules import NoiseSchedule  # noqa: F401
