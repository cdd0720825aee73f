"""Network parts rewritten so that a channels_last (NHWC) tensor stays NHWC through the forward *and* the backward.

LatentDAPS differentiates the decoder at every MCMC step. With the decoder in channels_last and compiled, two of
diffusers' parts break the layout of the gradient (an H100 profile, docs/benchmarks.md):

* ``GroupNorm``: torch's kernel makes its input contiguous (NCHW), so the traced graph records NCHW gradients for
  every convolution that feeds a group norm; cuDNN's backward then copies each of them back to NHWC, one copy per
  convolution (12% of the decoder's forward and backward at 10 images);
* ``Upsample2D``'s nearest ``F.interpolate``: its backward is a scatter with atomic adds (2.1 ms per call at 256 x
  256 x 128 channels, 10 images).

:class:`LayoutGroupNorm` writes the same normalisation, (x - mean) / sqrt(var + eps) * weight + bias over each group
of C / G channels and all positions (Wu & He 2018, eq. 1), with reductions and elementwise operations, which keep
their input's layout, in float32 as autocast runs ``group_norm`` (the result in the input's dtype). :func:`nearest_2x` repeats each pixel 2 x 2 by a
broadcast and a reshape in the input's own layout, whose backward sums the four copies.
:func:`keep_channels_last` puts both into a network in place (state_dict keys and weights unchanged).
"""
from __future__ import annotations

import torch


class LayoutGroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` whose output and input gradient have the input's memory layout. Computed in float32 at
    least (as autocast runs ``group_norm``); a bfloat16 / float16 input gets its result rounded to its own dtype (in
    the decoder the next convolution rounds it so anyway, after the activation: this halves the traffic of the
    norm's saved tensors and gradients). Same parameters and state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(1, (self.num_groups, x.shape[1] // self.num_groups))  # a view in NCHW and NHWC
        var, mean = torch.var_mean(h, dim=tuple(range(2, h.dim())), keepdim=True, correction=0)
        h = ((h - mean) * torch.rsqrt(var + self.eps)).flatten(1, 2)
        if self.affine:
            shape = (-1,) + (1,) * (x.dim() - 2)
            h = h * self.weight.view(shape) + self.bias.view(shape)
        return h.to(x.dtype) if x.dtype in (torch.bfloat16, torch.float16) else h


def nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling by 2 of a (N, C, H, W) tensor, equal to ``F.interpolate(x, scale_factor=2,
    mode="nearest")``, in the input's layout (NHWC stays NHWC) and with a reduction, not a scatter, as backward."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, 2, w, 2, c)
        return y.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def _upsample_first(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x = args[0]
    size = args[1] if len(args) > 1 else kwargs.get("output_size")
    if size is not None and tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
        raise ValueError(f"{type(module).__name__} with keep_channels_last upsamples by 2 only: got output_size "
                         f"{tuple(size)} for an input of {tuple(x.shape[-2:])}")
    return (nearest_2x(x),) + tuple(args[1:]), kwargs


def keep_channels_last(network: torch.nn.Module) -> None:
    """In place: every ``GroupNorm`` of ``network`` becomes a :class:`LayoutGroupNorm`, and every diffusers
    ``Upsample2D`` that interpolates (without a norm; its convolution kept) upsamples by 2 with :func:`nearest_2x`
    instead (a forward pre-hook; the module's own interpolation switched off; another ``output_size`` is refused)."""
    from diffusers.models.upsampling import Upsample2D

    for layer in network.modules():
        if type(layer) is torch.nn.GroupNorm:
            layer.__class__ = LayoutGroupNorm
        elif (isinstance(layer, Upsample2D) and layer.interpolate and not layer.use_conv_transpose
              and layer.norm is None):
            layer.interpolate = False
            layer.register_forward_pre_hook(_upsample_first, with_kwargs=True)
