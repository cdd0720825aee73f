"""Saving images in [-1, 1] as PNG, and result grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) uint8; NaN shown as black."""
    x = torch.nan_to_num(img.detach().float().cpu(), nan=-1.0).clamp(-1, 1)
    arr = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def save_png(img: torch.Tensor, path: Path) -> None:
    Image.fromarray(to_uint8(img)).save(path)


def save_grid(rows: Sequence[Sequence[torch.Tensor | None]], path: Path, pad: int = 2) -> None:
    """Save a grid of (C, H, W) images given row by row; ``None`` cells stay white."""
    cells = [c for row in rows for c in row if c is not None]
    c, h, w = cells[0].shape
    ncol = max(len(r) for r in rows)
    canvas = torch.ones(c, len(rows) * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is not None:
                top, left = pad + i * (h + pad), pad + j * (w + pad)
                canvas[:, top:top + h, left:left + w] = cell.detach().float().cpu()
    save_png(canvas, path)
