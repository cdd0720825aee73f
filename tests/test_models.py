"""Denoisers: the exact GMM denoiser, VP preconditioning, sigma/timestep maps, diffusers folders."""
import json

import pytest
import torch

from cores.gmm import IsotropicMixture, linear_posterior
from cores.models import GaussianMixtureDenoiser, ScheduleTimesteps, VPEpsDenoiser, VPTimesteps, build_model, gmm_model


def test_gmm_denoiser_single_gaussian_closed_form():
    mu, s, sigma = torch.randn(1, 6), 0.7, 1.3
    d = GaussianMixtureDenoiser(IsotropicMixture(torch.ones(1), mu, torch.tensor([s])), (1, 2, 3))
    x = torch.randn(5, 1, 2, 3)
    expected = (s**2 * x.flatten(1) + sigma**2 * mu) / (s**2 + sigma**2)
    torch.testing.assert_close(d.denoise(x, sigma).flatten(1), expected)


def test_gmm_denoiser_is_tweedie_of_its_log_density():
    d = gmm_model(shape=(1, 3, 3), num_components=3, component_std=0.3).double()
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    sigma = 0.8
    (g,) = torch.autograd.grad(d.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(d.score(x, sigma), g)
    torch.testing.assert_close(d.denoise(x, sigma), x + sigma**2 * g)


def test_twins_are_180_degree_rotations():
    d = gmm_model(shape=(1, 8, 8), num_components=2, twins=True)
    m = d.means.view(4, 1, 8, 8)
    torch.testing.assert_close(m[2:], m[:2].flip(-2, -1))


def test_linear_posterior_single_gaussian_against_formula():
    mu, s = torch.randn(1, 3, dtype=torch.float64), 0.9
    a = torch.randn(2, 3, dtype=torch.float64)
    y = torch.randn(2, dtype=torch.float64)
    post = linear_posterior(IsotropicMixture(torch.ones(1, dtype=torch.float64), mu, torch.tensor([s])), a, y, 0.3)
    prec = torch.eye(3, dtype=torch.float64) / s**2 + a.T @ a / 0.09
    cov = torch.linalg.inv(prec)
    torch.testing.assert_close(post.covs[0], cov)
    torch.testing.assert_close(post.means[0], cov @ (mu[0] / s**2 + a.T @ y / 0.09))


def test_timestep_maps_invert_and_agree():
    from diffusers import DDPMScheduler

    sched = ScheduleTimesteps(DDPMScheduler(beta_schedule="linear").alphas_cumprod)
    for t in (10.0, 250.5, 900.0):
        assert sched.timestep(sched.sigma(t)) == pytest.approx(t, abs=1e-3)
    vp = VPTimesteps()
    for s in (0.05, 0.5, 5.0, 50.0):
        assert sched.timestep(s) == pytest.approx(vp.timestep(s), abs=3.0)  # DDPM linear ~ continuous VP
        assert vp.sigma(vp.timestep(s)) == pytest.approx(s, rel=1e-6)


class ConstEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t):
        self.seen.append((x.clone(), t.clone()))
        return torch.ones_like(x) * 0.5


def test_vp_preconditioning():
    net = ConstEps()
    d = VPEpsDenoiser(net, VPTimesteps(), (1, 2, 2))
    x, sigma = torch.randn(3, 1, 2, 2), 2.0
    torch.testing.assert_close(d.denoise(x, sigma), x - sigma * 0.5)
    x_in, t = net.seen[-1]
    torch.testing.assert_close(x_in, x / (1 + sigma**2) ** 0.5)
    assert t.shape == (3,) and float(t[0]) == pytest.approx(float(999 * ((0.01 + 2 * 19.9 * torch.log1p(
        torch.tensor(4.0, dtype=torch.float64))) ** 0.5 - 0.1) / 19.9), rel=1e-5)


def test_diffusers_folder_round_trip(pixel_model_dir):
    from diffusers import UNet2DModel

    d = build_model({"name": "diffusers", "path": str(pixel_model_dir)})
    net = UNet2DModel.from_pretrained(pixel_model_dir / "unet")
    x = torch.randn(2, 3, 16, 16)
    t = torch.full((2,), d.timesteps.timestep(1.0))
    torch.testing.assert_close(d.denoise(x, 1.0), x - net(x / 2**0.5, t).sample)
    assert d.image_shape == (3, 16, 16) and not d.latent


def test_latent_model_decodes_with_straight_through_gradient(latent_model_dir):
    d = build_model({"name": "diffusers", "path": str(latent_model_dir)})
    assert d.latent and d.in_shape == (3, 4, 4) and d.image_shape == (3, 16, 16)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    x = d.decode(z)
    assert x.shape == (2, 3, 16, 16)
    x.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    unq = build_model({"name": "diffusers", "path": str(latent_model_dir), "quantize": False})
    assert not torch.allclose(unq.decode(z.detach()), x.detach())


def test_decoder_attention_as_matrix_products_matches_sdpa_and_channels_last(latent_model_dir):
    """The decoder's attention runs through explicit matrix products (matmul_attention): the decoded image and its
    gradient equal those of diffusers' default (scaled_dot_product_attention); channels_last puts the decoder's
    convolution weights in NHWC as well as the UNet's."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    d = build_model({"name": "diffusers", "path": str(latent_model_dir)})
    layers = [m for m in d.autoencoder.decoder.modules() if isinstance(m, Attention)]
    assert layers and all(isinstance(m.processor, AttnProcessor) for m in layers)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = d.decode(z)
    d.double()  # the gradients compared in float64 (the matrix products' softmax stays float32)
    z64 = z.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(d.decode(z64).pow(2).sum(), z64)
    for m in layers:
        m.set_processor(AttnProcessor2_0())
    (grad2,) = torch.autograd.grad(d.decode(z64).pow(2).sum(), z64)
    torch.testing.assert_close(grad, grad2, rtol=1e-5, atol=1e-6)
    d.float()
    torch.testing.assert_close(d.decode(z), x, rtol=1e-5, atol=1e-6)
    fast = build_model({"name": "diffusers", "path": str(latent_model_dir), "channels_last": True})
    conv = next(m for m in fast.autoencoder.decoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.shape[-1] > 1
    sdpa = build_model({"name": "diffusers", "path": str(latent_model_dir), "decoder_attention": "sdpa"})
    assert all(isinstance(m.processor, AttnProcessor2_0) for m in sdpa.autoencoder.decoder.modules()
               if isinstance(m, Attention))
    with pytest.raises(ValueError, match="decoder_attention must be 'matmul' or 'sdpa'"):
        build_model({"name": "diffusers", "path": str(latent_model_dir), "decoder_attention": "flash"})
    torch.testing.assert_close(fast.decode(z), x, rtol=1e-4, atol=1e-5)


def test_missing_model_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        build_model({"name": "diffusers", "path": str(tmp_path / "nope")})


def test_bad_model_keys(tmp_path, pixel_model_dir):
    with pytest.raises(ValueError, match="unknown gmm model keys"):
        build_model({"name": "gmm", "shape": [1, 2, 2], "colour": 1})
    with pytest.raises(ValueError, match="sigma_mapping"):
        build_model({"name": "diffusers", "path": str(pixel_model_dir), "sigma_mapping": "banana"})
    meta = json.loads((pixel_model_dir / "denoiser.json").read_text())
    assert meta["kind"] == "pixel"


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_compiled_networks_warm_up_once_and_match(eager_compile, kind, pixel_model_dir, latent_model_dir):
    path = str(pixel_model_dir if kind == "pixel" else latent_model_dir)
    plain = build_model({"name": "diffusers", "path": path})
    fast = build_model({"name": "diffusers", "path": path, "compile": "default"})
    assert fast.compiled == "default" and plain.compiled == "none"
    assert list(fast.state_dict()) == list(plain.state_dict())  # in-place compile: checkpoints keep their keys
    fast.warm_up(3)
    traced = eager_compile["stats"]["unique_graphs"]
    assert traced >= 1
    x = torch.randn(3, *fast.in_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for sigma in (5.0, 0.7, 0.05):  # the sampler's noise levels change every call: no new trace
            torch.testing.assert_close(fast.denoise(x, sigma), plain.denoise(x, sigma))
        torch.testing.assert_close(fast.decode(x), plain.decode(x))
    assert eager_compile["stats"]["unique_graphs"] == traced, dict(eager_compile["stats"])


def test_compile_mode_is_checked(pixel_model_dir):
    with pytest.raises(ValueError, match="auto or one of none, default, max-autotune-no-cudagraphs"):
        build_model({"name": "diffusers", "path": str(pixel_model_dir), "compile": "reduce-overhead"})
    with pytest.raises(ValueError, match="does not serve XLA"):
        build_model({"name": "diffusers", "path": str(pixel_model_dir), "compile": "default"}, "xla")
