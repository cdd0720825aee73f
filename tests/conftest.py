"""Shared fixtures: small random-weight diffusers models (pixel and latent) and tiny image folders."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_unet(channels: int, size: int, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8).eval()


def tiny_vq(channels: int, seed: int = 0):
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                   latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3, norm_num_groups=4).eval()


def save_model(root: Path, kind: str, channels: int = 3, size: int = 16) -> Path:
    """A random-weight model folder in the layout of cores.models.diffusers_model."""
    from diffusers import DDPMScheduler

    meta = {"kind": kind, "image_shape": [channels, size, size]}
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "scheduler")
    if kind == "pixel":
        tiny_unet(channels, size).save_pretrained(root / "unet", safe_serialization=True)
    else:
        tiny_unet(3, size // 4).save_pretrained(root / "unet", safe_serialization=True)
        tiny_vq(channels).save_pretrained(root / "vqvae", safe_serialization=True)
        meta.update(autoencoder="vq", latent_scale=1.0)
    (root / "denoiser.json").write_text(json.dumps(meta))
    return root


def save_images(root: Path, n: int, size: int, channels: int = 3, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((size, size, channels)) * 255).astype(np.uint8)
        Image.fromarray(arr[..., 0] if channels == 1 else arr).save(root / f"{i:05d}.png")
    return root


@pytest.fixture(scope="session")
def pixel_model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("pixel_model"), "pixel")


@pytest.fixture(scope="session")
def latent_model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("latent_model"), "latent")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    return save_images(tmp_path_factory.mktemp("images"), 3, 16)


@pytest.fixture(scope="session")
def gmm():
    """An 8x8 two-component Gaussian-mixture prior and phase-retrieval measurements of two of its draws."""
    from cores.models import build_model
    from cores.operators import PhaseRetrieval

    d = build_model({"name": "gmm", "shape": [1, 8, 8], "num_components": 2})
    x = d.sample(2, torch.Generator().manual_seed(0))[0]
    return d, PhaseRetrieval()(x)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module (tiny exact problems: a second thread only adds overhead)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's eager backend: its trace and guards without inductor's code generation (a minute
    per network on 2 CPU cores; inductor's speed and numbers are measured on the GPU, docs/benchmarks.md)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from utils.device import compiled

    def forget() -> None:  # the process-wide compiled helpers built under this fixture stay with it
        torch._dynamo.reset()
        compiled.cache_clear()

    plain = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: plain(fn, backend="eager", **kw))
    forget()
    counters.clear()
    yield counters
    forget()


@pytest.fixture
def compile_fused_as_on_cuda(eager_compile, monkeypatch):
    """A function that makes the sampler's fused arithmetic (``utils.device.fused`` in cores.mcmc and
    cores.operators) compile on the CPU as it does on CUDA, with :func:`eager_compile`'s backend; it returns the
    dynamo counters."""
    import cores.mcmc
    import cores.operators
    from utils.device import fused

    def force():
        as_on_cuda = lambda fn, device: fused(fn, torch.device("cuda"))  # noqa: E731
        monkeypatch.setattr(cores.mcmc, "fused", as_on_cuda)
        monkeypatch.setattr(cores.operators, "fused", as_on_cuda)
        return eager_compile
    return force
