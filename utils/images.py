"""Saving images in [-1, 1] as PNG, and result grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) uint8 on the CPU, converted on the image's device (a quarter of
    the bytes to copy); NaN shown as black."""
    x = torch.nan_to_num(img.detach().float(), nan=-1.0).clamp(-1, 1)
    arr = ((x + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def save_png(img: torch.Tensor, path: Path) -> None:
    Image.fromarray(to_uint8(img)).save(path)


def save_grid(rows: Sequence[Sequence[torch.Tensor | np.ndarray | None]], path: Path, pad: int = 2) -> None:
    """Save a grid of images given row by row, each a (C, H, W) tensor in [-1, 1] or its :func:`to_uint8` array, all
    of one height and width (grayscale cells are shown in gray in an RGB grid); ``None`` cells stay white. zlib level
    1, not PIL's default 6: a run rewrites its grid after every batch, and writing the run's files (mostly this grid)
    took 1.2-1.9 s per job of an ADM sweep at 10 images x 4 particles on the H100's host (docs/benchmarks.md,
    twelfth session); level 1 gives the same pixels in a slightly larger file."""
    cells = [[c if c is None or isinstance(c, np.ndarray) else to_uint8(c) for c in row] for row in rows]
    given = [c for row in cells for c in row if c is not None]
    if not given:
        raise ValueError(f"save_grid: no image to save in {path} (every cell is None)")
    if any(c.dtype != np.uint8 for c in given):
        raise TypeError("save_grid: an array cell must be uint8, as to_uint8 returns (a tensor cell is converted)")
    h, w = given[0].shape[:2]
    rgb = any(c.ndim == 3 for c in given)
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, *((3,) if rgb else ())), 255, np.uint8)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if cell is not None:
                top, left = pad + i * (h + pad), pad + j * (w + pad)
                canvas[top:top + h, left:left + w] = cell[..., None] if rgb and cell.ndim == 2 else cell
    Image.fromarray(canvas).save(path, compress_level=1)
