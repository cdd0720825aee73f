"""Network parts rewritten so that a channels_last (NHWC) tensor stays NHWC through the forward *and* the backward.

LatentDAPS differentiates the decoder at every MCMC step. With the decoder in channels_last and compiled, two of
diffusers' parts break the layout of the gradient (an H100 profile, docs/benchmarks.md):

* ``GroupNorm``: torch's kernel makes its input contiguous (NCHW), and its meta function, which the compiled graph's
  layouts follow, returns NCHW; so the graph's gradient for every convolution that feeds a group norm is NCHW, and
  cuDNN's backward copies each one back to NHWC (0.23 ms per copy at 10 images, 23 such copies per call);
* ``Upsample2D``'s nearest ``F.interpolate``: its backward is a scatter with atomic adds (2.1 ms per call for the
  larger of the LDM-FFHQ decoder's two upsamplers, 10 images), and for 64 or more images diffusers makes its input
  contiguous (NCHW) first.

In the UNet's forward (the ODE; ffhq256 ADM, 40 images) torch's group norm under the compiled graph left two fused
norm kernels of 3.3 ms each per call at 256 x 256 pixels; with the statistics taken per channel (below) the UNet
takes 16% less time (docs/benchmarks.md, fifth session).

:class:`LayoutGroupNorm` writes the same normalisation, (x - mean) / sqrt(var + eps) * weight + bias over each group
of C / G channels and all positions (Wu & He 2018, eq. 1), with reductions and elementwise operations, which keep
their input's layout, in float32 as autocast runs ``group_norm``. :func:`nearest_2x` repeats each pixel 2 x 2 by a
broadcast and a reshape in the input's own layout, whose backward sums the four copies; :class:`LayoutUpsample2D`
uses it. :func:`keep_channels_last` puts both into a network in place (state_dict keys and weights unchanged).
"""
from __future__ import annotations

import torch
from diffusers.models.upsampling import Upsample2D


class LayoutGroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` whose output and input gradient have the input's memory layout; computed and returned in
    float32 at least (as autocast runs ``group_norm``). Same parameters and state_dict.

    The statistics come per channel, reductions over the positions only (coalesced in NHWC, where a group's channels
    are strided), and combine per group by the law of total variance over equal counts: mean_g = mean_c of mean_c,
    var_g = mean_c of (var_c + (mean_c - mean_g)^2). The normalisation is then one affine map per (image, channel).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        if h.dim() < 3:  # (N, C): no positions, no layout to keep
            return super().forward(h)
        var_c, mean_c = torch.var_mean(h, dim=tuple(range(2, h.dim())), keepdim=True, correction=0)
        mean_c, var_c = (t.unflatten(1, (self.num_groups, -1)) for t in (mean_c, var_c))
        mean = mean_c.mean(2, keepdim=True)
        var = (var_c + (mean_c - mean).square()).mean(2, keepdim=True)
        scale = torch.rsqrt(var + self.eps).expand_as(mean_c).flatten(1, 2)
        shift = -mean.expand_as(mean_c).flatten(1, 2) * scale
        if self.affine:
            shape = (-1,) + (1,) * (x.dim() - 2)
            scale = scale * self.weight.view(shape)
            shift = shift * self.weight.view(shape) + self.bias.view(shape)
        return h * scale + shift


def nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling by 2 of a (N, C, H, W) tensor, equal to ``F.interpolate(x, scale_factor=2,
    mode="nearest")``, in the input's layout (NHWC stays NHWC; a tensor that is both, e.g. of 1 x 1 pixels, counts as
    NCHW) and with a reduction, not a scatter, as backward."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, 2, w, 2, c)
        return y.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class LayoutUpsample2D(Upsample2D):
    """diffusers' ``Upsample2D`` (interpolating, no norm, optional convolution) with :func:`nearest_2x`: upsamples by
    2 only (another ``output_size`` is refused) and never makes its input contiguous. Same state_dict."""

    def forward(self, hidden_states: torch.Tensor, output_size: int | tuple[int, int] | None = None, *args,
                **kwargs) -> torch.Tensor:
        if hidden_states.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} of {self.channels} channels got {hidden_states.shape[1]}")
        h, w = hidden_states.shape[-2:]
        if output_size is not None:
            size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
            if size != (2 * h, 2 * w):
                raise ValueError(f"{type(self).__name__} upsamples by 2 only: got output_size {size} for an "
                                 f"input of {(h, w)} (keep_channels_last does not apply to this network)")
        hidden_states = nearest_2x(hidden_states)
        if self.use_conv:
            hidden_states = (self.conv if self.name == "conv" else self.Conv2d_0)(hidden_states)
        return hidden_states


def keep_channels_last(network: torch.nn.Module) -> torch.nn.Module:
    """In place, and returned: ``network`` with its weights in NHWC (``memory_format=torch.channels_last``), every
    ``GroupNorm`` a :class:`LayoutGroupNorm` and every diffusers ``Upsample2D`` that interpolates without a norm a
    :class:`LayoutUpsample2D` (the class swapped: the same parameters, buffers and state_dict keys)."""
    for layer in network.modules():
        if type(layer) is torch.nn.GroupNorm:
            layer.__class__ = LayoutGroupNorm
        elif (type(layer) is Upsample2D and layer.interpolate and not layer.use_conv_transpose
              and layer.norm is None):
            layer.__class__ = LayoutUpsample2D
    return network.to(memory_format=torch.channels_last)
