"""ddpm_lib: the small library behind the DDPM book.

One module per idea, in the order data flows (no module imports a later one; a test reads
the import graph from the source, tests/test_package_structure.py):
``data`` -> ``diffusion`` (the equations) -> ``schedules`` (NoiseSchedule) -> ``analytic``
(noise predictors with no error, for toy data) -> ``unet`` and ``autoencoder`` (the
networks) -> ``accel`` (precision, compile, processes), ``runs`` (generators, optimiser step,
checkpoint checks) and ``ema`` -> ``train`` -> ``samplers`` and ``guidance`` -> ``features``
(images to features) -> ``metrics`` (the scores) -> ``viz``. ``io`` writes and reads files
atomically, ``pretrained`` loads shipped weights, ``book`` sets up a chapter, ``checks`` says
when value checks run, ``bench`` measures speed, and ``python -m ddpm_lib`` trains and
samples from the command line.
"""
__version__ = "0.1.0"

from .schedules import NoiseSchedule  # noqa: F401
