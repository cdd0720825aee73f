"""Build dataset/demo-natural/: ten real 256x256 RGB images from scikit-image's bundled data.

All are public domain or CC0 (see each function's docstring in skimage.data). Each image is centre-
cropped to a square and resized with Lanczos; grayscale ones are replicated to three channels.
Needs scikit-image (not a project requirement): pip install scikit-image && python scripts/make_demo_natural.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
         "camera", "coins", "brick")


def square(img: np.ndarray, size: int) -> Image.Image:
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(np.ascontiguousarray(img[top:top + s, left:left + s]).astype(np.uint8))
    return crop.resize((size, size), Image.Resampling.LANCZOS)


def main() -> None:
    import skimage.data

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="dataset/demo-natural")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(NAMES):
        square(getattr(skimage.data, name)(), args.size).save(out / f"{i:05d}_{name}.png")
        print(out / f"{i:05d}_{name}.png")


if __name__ == "__main__":
    main()
