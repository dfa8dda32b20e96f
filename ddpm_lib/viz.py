"""Pictures: image grids, strips over t, and saving them."""
from __future__ import annotations

import numpy as np
import torch

from .features import to_uint8

# One figure style for the book. A chapter figure is drawn at most COLUMN_WIDTH inches wide at
# FIGURE_DPI, so its PNG (700 px) fits the content column of the rendered book at 1280 px
# (measured: 752 px) and is shown at its own size: a 10 pt label is 14 px on screen. The
# background is opaque white, so black text stays readable under the book's dark theme.
COLUMN_WIDTH = 7.0
FIGURE_DPI = 100
BOOK_STYLE = {
    "figure.dpi": FIGURE_DPI, "savefig.dpi": FIGURE_DPI,
    "figure.figsize": (COLUMN_WIDTH, 3.0),
    "figure.facecolor": "white", "savefig.facecolor": "white", "axes.facecolor": "white",
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "figure.titlesize": 11,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 9,
    "axes.spines.top": False, "axes.spines.right": False,
}


def use_book_style() -> None:
    """Apply :data:`BOOK_STYLE` to matplotlib; :func:`ddpm_lib.book.setup` calls it, so every
    chapter's figures share it (see "How to use this book", "Folded checks and figures")."""
    import matplotlib
    matplotlib.rcParams.update(BOOK_STYLE)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] into one uint8 array (H', W') or (H', W', 3).

    ``nrow`` images per row; ``pad_value`` in [-1, 1] is the colour between tiles.
    Used in chapter 2, "Linear and cosine schedules", and chapter 6; :func:`show_grid` draws it
    in the other chapters.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    N, C, H, W = images.shape
    if C not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {C}")
    ncol = min(nrow, N)
    nrows = -(-N // ncol)
    pad = int(round((pad_value + 1) * 127.5))
    grid = np.full((C, nrows * (H + padding) + padding, ncol * (W + padding) + padding), pad, np.uint8)
    tiles = to_uint8(images)
    for i in range(N):
        r, c = divmod(i, ncol)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, y:y + H, x:x + W] = tiles[i]
    return grid[0] if C == 1 else grid.transpose(1, 2, 0)


def show_grid(images: torch.Tensor, nrow: int = 8, title: str | None = None, ax=None, **kwargs):
    """Show :func:`make_grid` of ``images`` with matplotlib. Returns the axes.
    Used in most chapters, first in chapter 1, "A garment in the fog"."""
    import matplotlib.pyplot as plt
    grid = make_grid(images, nrow=nrow, **kwargs)
    if ax is None:
        size = (min(COLUMN_WIDTH, grid.shape[1] / 40 + 1), min(COLUMN_WIDTH, grid.shape[0] / 40 + 1))
        _, ax = plt.subplots(figsize=size)
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """Save :func:`make_grid` of ``images`` as a PNG file. Used by ``python -m ddpm_lib sample
    --out`` in chapter 5, "The same from the command line"."""
    import matplotlib.pyplot as plt
    grid = make_grid(images, nrow=nrow)
    plt.imsave(path, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255)
