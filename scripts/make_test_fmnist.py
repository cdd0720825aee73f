"""Write the first N Fashion-MNIST test images as 32x32 one-channel PNGs (28x28 padded with black) to dataset/test-fmnist/.

    python scripts/make_test_fmnist.py [--root /usr/share/datasets/fashion-mnist] [--n 100]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import FMNIST_ROOT, fashion_mnist  # noqa: E402
from utils.images import save_png  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default=FMNIST_ROOT)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", default="dataset/test-fmnist")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(fashion_mnist("test", args.root)[: args.n]):
        save_png(img, out / f"{i:05d}.png")
    print(f"wrote {args.n} images to {out}")


if __name__ == "__main__":
    main()
