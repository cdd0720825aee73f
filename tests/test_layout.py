"""cores.layout: group norm and 2x upsampling that keep channels_last through forward and backward, and equal
torch's own."""
import pytest
import torch
import torch.nn.functional as F

from cores.layout import LayoutGroupNorm, LayoutUpsample2D, keep_channels_last, nearest_2x
from cores.models import build_model

CL = torch.channels_last


def _value_and_grad(fn, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad((y * weight).sum(), x)
    return y, g


def _norms(affine: bool, channels: int = 12, groups: int = 4) -> tuple[torch.nn.GroupNorm, LayoutGroupNorm]:
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6, affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(channels, generator=gen))
            norm.bias.copy_(torch.randn(channels, generator=gen))
    ours = LayoutGroupNorm(groups, channels, eps=1e-6, affine=affine).double()
    ours.load_state_dict(norm.state_dict())
    return norm, ours


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_group_norm_equals_torch_and_keeps_layout(layout, affine):
    norm, ours = _norms(affine)
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(2, 12, 5, 7, dtype=torch.float64, generator=gen) + 1).to(memory_format=layout)
    w = torch.randn(2, 12, 5, 7, dtype=torch.float64, generator=gen).to(memory_format=layout)  # the upstream gradient
    y, g = _value_and_grad(norm, x, w)
    y2, g2 = _value_and_grad(ours, x, w)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(g2, g)
    assert y2.is_contiguous(memory_format=layout) and g2.is_contiguous(memory_format=layout)
    if layout is CL:  # the layouts a compiled graph records (meta tensors) keep NHWC too
        meta = torch.empty(2, 12, 5, 7, device="meta").to(memory_format=CL)
        assert ours.float().to("meta")(meta).is_contiguous(memory_format=CL)


def test_group_norm_of_a_bfloat16_input_is_float32_as_under_autocast():
    """A bfloat16 activation with float32 parameters (a convolution's output under autocast): the result is float32
    and equals torch's group norm of the same values in float32; a 3-D (N, C, L) input works as well."""
    norm, ours = _norms(affine=True)
    norm, ours = norm.float(), ours.float()
    x = torch.randn(2, 12, 6, 6, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, norm(x.float()), rtol=1e-5, atol=1e-5)
    seq = torch.randn(2, 12, 9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(seq), norm(seq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 12])
def test_group_norm_edge_groups_and_shapes_equal_torch(groups):
    """One group and one channel per group; a transposed 3-D input (diffusers' attention norms a (N, L, C) tensor's
    transpose) keeps its strides; an (N, C) input has no positions and goes to torch's kernel."""
    norm, ours = _norms(affine=True, groups=groups)
    gen = torch.Generator().manual_seed(4)
    x = 2 * torch.randn(3, 12, 4, 5, dtype=torch.float64, generator=gen) - 1
    w = torch.randn(3, 12, 4, 5, dtype=torch.float64, generator=gen)
    y, g = _value_and_grad(norm, x, w)
    y2, g2 = _value_and_grad(ours, x, w)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(g2, g)
    seq = torch.randn(3, 9, 12, dtype=torch.float64, generator=gen).transpose(1, 2)
    torch.testing.assert_close(ours(seq), norm(seq))
    assert ours(seq).stride() == seq.stride()
    flat = torch.randn(3, 12, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(ours(flat), norm(flat))


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_nearest_2x_equals_interpolate_and_keeps_layout(layout):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=layout)
    w = torch.randn(2, 3, 8, 10, generator=gen).to(memory_format=layout)
    y, g = _value_and_grad(lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest"), x, w)
    y2, g2 = _value_and_grad(nearest_2x, x, w)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(g2, g)
    assert y2.is_contiguous(memory_format=layout) and g2.is_contiguous(memory_format=layout)


def test_upsampler_keeps_channels_last_at_64_images_and_refuses_other_sizes():
    """diffusers makes a batch of 64 or more contiguous (NCHW) before interpolating; LayoutUpsample2D does not, and
    gives the same values (its convolution included)."""
    from diffusers.models.upsampling import Upsample2D

    up = Upsample2D(4, use_conv=True).to(memory_format=CL)
    ours = Upsample2D(4, use_conv=True).to(memory_format=CL)
    ours.load_state_dict(up.state_dict())
    keep_channels_last(ours)
    assert type(ours) is LayoutUpsample2D
    x = torch.randn(64, 4, 3, 3, generator=torch.Generator().manual_seed(4)).to(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), up(x))
        assert ours(x, output_size=(6, 6)).shape[-2:] == (6, 6) and ours(x, 6).shape[-2:] == (6, 6)
        bare, bare_ours = Upsample2D(4), Upsample2D(4)  # no convolution: the upsampling's own output layout
        keep_channels_last(bare_ours)
        assert bare_ours(x).is_contiguous(memory_format=CL) and not bare(x).is_contiguous(memory_format=CL)
    for size in ((5, 5), 7):
        with pytest.raises(ValueError, match="upsamples by 2 only"):
            ours(x, output_size=size)


def test_channels_last_decoder_keeps_its_image_and_gradient(latent_model_dir):
    """channels_last swaps the decoder's group norms and upsamplers (keep_channels_last): the decoded image and its
    gradient stay those of diffusers' modules (float64), with the same state_dict."""
    plain = build_model({"name": "diffusers", "path": str(latent_model_dir)}).double()
    fast = build_model({"name": "diffusers", "path": str(latent_model_dir), "channels_last": True}).double()
    decoder = fast.autoencoder.decoder
    assert any(type(m) is LayoutGroupNorm for m in decoder.modules())
    assert not any(type(m) is torch.nn.GroupNorm for m in decoder.modules())
    assert any(type(m) is LayoutUpsample2D for m in decoder.modules())
    assert fast.autoencoder.state_dict().keys() == plain.autoencoder.state_dict().keys()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(2, *plain.image_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x, g = _value_and_grad(plain.decode, z, w)
    x2, g2 = _value_and_grad(fast.decode, z, w)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(g2, g)


def test_keep_channels_last_leaves_other_norms_alone():
    net = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(4), torch.nn.Conv2d(4, 4, 1))
    assert keep_channels_last(net) is net
    assert type(net[0]) is LayoutGroupNorm and type(net[1]) is torch.nn.LayerNorm
    assert net[2].weight.is_contiguous(memory_format=CL)


def test_channels_last_unet_keeps_its_output(tmp_path):
    """An ADM-shaped UNet (resnet up / down sampling, scale-shift norms, attention, as cores.convert builds it) with
    channels_last gets the layout-keeping norms and upsamplers and denoises as diffusers' modules do (float64)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=3, out_channels=6, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
                downsample_type="resnet", upsample_type="resnet").save_pretrained(tmp_path / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "denoiser.json").write_text('{"kind": "pixel", "image_shape": [3, 8, 8], "eps_channels": 3}')
    plain = build_model({"name": "diffusers", "path": str(tmp_path)}).double()
    fast = build_model({"name": "diffusers", "path": str(tmp_path), "channels_last": True}).double()
    layers = list(fast.net.modules())
    assert any(type(m) is LayoutGroupNorm for m in layers) and any(type(m) is LayoutUpsample2D for m in layers)
    assert not any(type(m) is torch.nn.GroupNorm for m in layers)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast.denoise(x.to(memory_format=CL), 0.7), plain.denoise(x, 0.7))
