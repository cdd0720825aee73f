"""Ground-truth images for a run: image folders (png / jpg) or draws from an analytic prior.

Images come out as float tensors in [-1, 1], shape (C, H, W), each with its global index (its
position in the sorted folder, used for seeds) and a name. Builders are picked by ``data.name``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DATASETS: dict[str, Callable[..., "Dataset"]] = {}


@dataclass
class Item:
    index: int
    name: str
    image: torch.Tensor


class Dataset:
    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]


def register(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    def wrap(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        DATASETS[name] = fn
        return fn
    return wrap


def fit_to(img: torch.Tensor, resolution: int, name: str) -> torch.Tensor:
    """Centre-crop to a square and resize to ``resolution`` (bicubic, antialiased), warning when it changes."""
    c, h, w = img.shape
    if (h, w) == (resolution, resolution):
        return img
    log.warning("%s is %dx%d: centre-cropped and resized to %d px", name, h, w, resolution)
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[:, top:top + s, left:left + s]
    return F.interpolate(img[None], size=(resolution, resolution), mode="bicubic", antialias=True,
                         align_corners=False)[0].clamp(-1, 1)


def load_image(path: Path, channels: int) -> torch.Tensor:
    """An image file as a (channels, H, W) tensor in [-1, 1]; a ValueError naming the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    except UnidentifiedImageError as err:
        raise ValueError(f"{path}: not an image file (empty, or another kind of file under an image name); "
                         f"replace it with a png/jpg image or move it out of {path.parent}") from err
    except (OSError, SyntaxError) as err:  # PIL: "image file is truncated", "broken PNG file", ...
        raise ValueError(f"{path}: damaged image file ({err}); copy it again from its source "
                         f"or move it out of {path.parent}") from err
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)


@register("image")
def image_folder(root: str, resolution: int, start_id: int = 0, end_id: int | None = None, channels: int = 3,
                 **unused: Any) -> Dataset:
    """Images of a folder in sorted order, [start_id, end_id)."""
    if unused:
        raise ValueError(f"unknown data keys for an image folder: {sorted(unused)}")
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder.resolve()} (data.root={root}); "
                                f"create it or point data.root at a folder of png/jpg images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no png/jpg images in {folder.resolve()} (data.root={root}): put the images there "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}) or point data.root at the folder that has them")
    end = len(files) if end_id is None else min(end_id, len(files))
    if not 0 <= start_id < end:
        raise ValueError(f"data.start_id={start_id}, data.end_id={end_id}: empty range for {len(files)} images")
    return Dataset([Item(i, files[i].stem, fit_to(load_image(files[i], channels), resolution, files[i].name))
                    for i in range(start_id, end)])


@register("gmm_samples")
def gmm_samples(prior: dict, num_images: int = 1, seed: int = 0, start_id: int = 0, end_id: int | None = None,
                resolution: int | None = None, **unused: Any) -> Dataset:
    """Draws from the analytic mixture prior described by ``prior`` (a gmm model config)."""
    from cores.models import build_model

    if unused:
        raise ValueError(f"unknown data keys for gmm_samples: {sorted(unused)}")
    model = build_model(prior)
    if resolution is not None and resolution != model.image_shape[-1]:
        raise ValueError(f"data.resolution={resolution} but the prior's images are {model.image_shape[-1]} px")
    x, labels = model.sample(num_images, torch.Generator().manual_seed(int(seed)))
    end = num_images if end_id is None else min(end_id, num_images)
    return Dataset([Item(i, f"gmm{i:05d}_c{int(labels[i])}", x[i].clamp(-1, 1)) for i in range(start_id, end)])


def build_dataset(cfg: dict) -> Dataset:
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in DATASETS:
        raise ValueError(f"unknown data name {name!r}: choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**cfg)
