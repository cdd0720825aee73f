"""cores.layout: group norm and 2x upsampling that keep channels_last through forward and backward, and equal
torch's own."""
import pytest
import torch
import torch.nn.functional as F

from cores.layout import LayoutGroupNorm, keep_channels_last, nearest_2x
from cores.models import build_model

CL = torch.channels_last


def _value_and_grad(fn, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad((y * weight).sum(), x)
    return y, g


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_group_norm_equals_torch_and_keeps_layout(layout):
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(4, 12, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=gen))
        norm.bias.copy_(torch.randn(12, generator=gen))
    ours = LayoutGroupNorm(4, 12, eps=1e-6).double()
    ours.load_state_dict(norm.state_dict())
    x = (3 * torch.randn(2, 12, 5, 7, dtype=torch.float64, generator=gen) + 1).to(memory_format=layout)
    w = torch.randn(2, 12, 5, 7, dtype=torch.float64, generator=gen).to(memory_format=layout)  # the upstream gradient
    y, g = _value_and_grad(norm, x, w)
    y2, g2 = _value_and_grad(ours, x, w)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(g2, g)
    low = x.to(torch.bfloat16)  # computed in float32 at least (here the parameters' float64), rounded to bfloat16
    torch.testing.assert_close(ours(low), norm(low.double()).to(torch.bfloat16), rtol=0, atol=0)
    assert y2.is_contiguous(memory_format=layout) and g2.is_contiguous(memory_format=layout)
    if layout is CL:  # the traced graph's layouts (meta tensors): torch's group norm turns NHWC into NCHW, ours not
        meta = torch.empty(2, 12, 5, 7, device="meta").to(memory_format=CL)
        assert not norm.float().to("meta")(meta).is_contiguous(memory_format=CL)
        assert ours.float().to("meta")(meta).is_contiguous(memory_format=CL)


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


def test_channels_last_decoder_keeps_its_image_and_gradient(latent_model_dir):
    """channels_last swaps the decoder's group norms and upsamplers (keep_channels_last): the decoded image and its
    gradient stay those of diffusers' modules (float64); an upsampler asked for another size is refused."""
    from diffusers.models.upsampling import Upsample2D

    plain = build_model({"name": "diffusers", "path": str(latent_model_dir)}).double()
    fast = build_model({"name": "diffusers", "path": str(latent_model_dir), "channels_last": True}).double()
    decoder = fast.autoencoder.decoder
    assert any(type(m) is LayoutGroupNorm for m in decoder.modules())
    assert not any(type(m) is torch.nn.GroupNorm for m in decoder.modules())
    ups = [m for m in decoder.modules() if isinstance(m, Upsample2D)]
    assert ups and not any(m.interpolate for m in ups)
    assert fast.autoencoder.state_dict().keys() == plain.autoencoder.state_dict().keys()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(2, *plain.image_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x, g = _value_and_grad(plain.decode, z, w)
    x2, g2 = _value_and_grad(fast.decode, z, w)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(g2, g)
    up = ups[0]
    h = torch.randn(1, up.channels, 3, 3, dtype=torch.float64)
    assert up(h).shape[-2:] == (6, 6)
    with pytest.raises(ValueError, match="upsamples by 2 only"):
        up(h, output_size=(5, 5))


def test_keep_channels_last_leaves_other_norms_alone():
    net = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(4), torch.nn.Conv2d(4, 4, 1))
    keep_channels_last(net)
    assert type(net[0]) is LayoutGroupNorm and type(net[1]) is torch.nn.LayerNorm
