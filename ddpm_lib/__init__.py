"""ddpm_lib: the small library behind the DDPM book.

One module per idea, in the order data flows:
``data`` -> ``diffusion`` (the equations) -> ``schedules`` (NoiseSchedule) -> ``unet`` ->
``train`` -> ``samplers`` -> ``viz``; ``pretrained`` loads shipped weights, ``book`` sets up
a chapter, ``checks`` says when value checks run, ``python -m ddpm_lib`` trains and samples
from the command line.
"""
__version__ = "0.1.0"

from .schedules import NoiseSchedule  # noqa: F401
