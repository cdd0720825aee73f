"""Exact conversion of the official DAPS checkpoints into diffusers modules.

* ADM pixel UNets (openai guided-diffusion ``UNetModel``: ffhq_10m.pt, imagenet256.pt) and the LDM UNet
  (latent-diffusion ``openaimodel.UNetModel``) -> ``UNet2DModel``. Scale-shift norm, residual up/down
  sampling, attention levels and the fused qkv projection all have diffusers counterparts:
  ``resnet_time_scale_shift='scale_shift'``, ``downsample_type='resnet'``, and the qkv convolution split
  into to_q / to_k / to_v in the head order of the checkpoint (legacy: per head [q, k, v]; new order:
  [q | k | v]). The timestep embedding is [cos, sin] with frequencies exp(-log(10^4) i / half), i.e.
  ``flip_sin_to_cos=True, freq_shift=0``. Learned-sigma nets keep all 2C output channels (the denoiser
  reads the first C).
* The class-conditional LDM UNet (openaimodel with ``use_spatial_transformer``, ``context_dim``: the ImageNet
  LDM cin256) -> ``UNet2DConditionModel``: each ``SpatialTransformer`` (GroupNorm, 1x1-conv proj_in, blocks of
  self-attention, cross-attention on the context and a GEGLU feed-forward, 1x1-conv proj_out, residual) is a
  ``Transformer2DModel`` with ``use_linear_projection=False`` under the same tensor names; the heads per level are
  ``num_heads`` (or width / ``num_head_channels``), which diffusers reads from ``attention_head_dim``.
* The taming / LDM ``VQModelInterface`` first stage -> ``VQModel`` (decoder levels in reverse order,
  1x1-conv attention -> linear layers; asymmetric downsampling padding is diffusers' padding=0 path).
* The latent-diffusion ``ClassEmbedder`` (cond_stage_model, ``conditioning_key: crossattn``) -> a
  ``torch.nn.Embedding`` of ours saved as ``class_embedding.safetensors``: context = embedding(label)[:, None, :]
  (cores.models.ClassConditionalEps).

tests/test_convert.py and tests/test_convert_cin.py check the outputs against the reference implementation's on
fixtures. Not supported, with an error that says so: class-conditional ADM UNets (``class_cond``), and attention
in the autoencoder's encoder/decoder levels.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import pickletools
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)
ADM_DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
UNSAFE_HELP = ("Loading it runs code stored in the file (pickle). If you trust where the file comes from, opt in "
               "with allow_unsafe_pickle=true in the model config (or --allow-unsafe-pickle for "
               "scripts/convert_checkpoint.py).")


def _pickle_damage(f: Any, count: int) -> str | None:
    """Why the next ``count`` pickles of the binary file ``f`` do not parse (pickletools.genops reads the opcodes
    without running any), None when they all end with STOP."""
    for i in range(count):
        try:
            for _ in pickletools.genops(f):
                pass
        except ValueError as err:
            return f"pickle {i + 1} does not parse: {str(err)[:120]}"
    return None


def checkpoint_damage(path: Path) -> str | None:
    """Why ``path`` is not an intact torch.save file, None when its structure is intact.

    Zip format (torch >= 1.6): the archive must open and its stored ``data.pkl`` parse (read through the member's
    local header: torch.save may write zero CRC-32s, set_crc32_options). Legacy format: its first pickle must be
    torch's magic number, and the protocol, system-info and object pickles after it must parse. Nothing is
    unpickled, so this tells a damaged file (truncated, random bytes, not a checkpoint) apart from an intact one
    that only weights_only loading refuses.
    """
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(f) as zf:
                    infos = [i for i in zf.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            except (zipfile.BadZipFile, EOFError, OSError) as err:
                return f"damaged zip archive: {err}"
            if not infos or infos[0].compress_type != zipfile.ZIP_STORED:
                return "zip archive without a stored data.pkl"
            f.seek(infos[0].header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            f.seek(infos[0].header_offset + 30 + name_len + extra_len)
            return _pickle_damage(io.BytesIO(f.read(infos[0].file_size)), 1)
        f.seek(0)
        try:
            magic = [arg for _, arg, _ in pickletools.genops(f)]
        except ValueError:
            magic = []
        if torch.serialization.MAGIC_NUMBER not in magic:
            return "neither a zip archive nor a legacy torch.save file"
        return _pickle_damage(f, 3)


def load_checkpoint(path: Path, allow_unsafe_pickle: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True; anything else only with the explicit opt-in.

    A failing load is reported in one of two ways: a damaged file (:func:`checkpoint_damage`: a truncated
    download, random bytes) as such, with the advice to download it again; an intact file that weights_only
    loading refuses (it pickles other objects than tensors and containers) with the opt-in ``UNSAFE_HELP``.
    Other errors of an intact file propagate unchanged.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's unpickler raises many types on garbage (IndexError, RuntimeError, ...)
        damage = checkpoint_damage(path)
        if damage is not None:
            raise ValueError(f"{path} is damaged or not a PyTorch checkpoint ({damage}): download it again") from err
        if not isinstance(err, pickle.UnpicklingError):
            raise
        if not allow_unsafe_pickle:
            raise ValueError(f"{path} holds objects that weights_only loading refuses ({str(err)[:300]}). "
                             f"{UNSAFE_HELP}") from err
    log.warning("loading %s with weights_only=False (allow_unsafe_pickle=true): the file can run code", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _as_list(v: Any) -> list:
    if isinstance(v, str):
        return [float(x) for x in v.split(",") if x.strip()]
    return list(v)


def unet_spec(arch: dict) -> dict:
    """Normalise an ADM (guided-diffusion) or LDM (openaimodel) UNet config.

    ADM configs give ``num_channels`` and ``attention_resolutions`` as resolutions (ds = image_size / res);
    LDM configs give ``model_channels`` and ``attention_resolutions`` as downsampling rates ds. With
    ``use_spatial_transformer`` (and ``context_dim``) the attention levels are SpatialTransformers: ``transformer``
    holds their context_dim, depth and heads per level (openaimodel: ``num_heads``, or width // num_head_channels).
    """
    arch = dict(arch)
    if arch.get("class_cond"):
        raise ValueError("class-conditional ADM UNets (class_cond: a label embedding added to the time embedding) "
                         "are not supported")
    if bool(arch.get("use_spatial_transformer")) != (arch.get("context_dim") is not None):
        raise ValueError("use_spatial_transformer and context_dim go together (openaimodel UNetModel)")
    size = int(arch["image_size"])
    if "num_channels" in arch:  # ADM
        ch = int(arch["num_channels"])
        mult = _as_list(arch.get("channel_mult") or ADM_DEFAULT_MULT[size])
        ds = {size // int(r) for r in _as_list(arch.get("attention_resolutions", []))}
        in_ch, out_ch = 3, 6 if arch.get("learn_sigma", False) else 3
    else:  # LDM openaimodel
        ch = int(arch["model_channels"])
        mult = _as_list(arch["channel_mult"])
        ds = {int(r) for r in _as_list(arch.get("attention_resolutions", []))}
        in_ch, out_ch = int(arch["in_channels"]), int(arch["out_channels"])
    widths = [int(ch * m) for m in mult]
    levels = len(widths)
    attn = sorted(i for i in range(levels) if 2**i in ds)
    head_ch = int(arch.get("num_head_channels", -1))
    updown = bool(arch.get("resblock_updown", False))
    transformer = None
    if arch.get("use_spatial_transformer"):
        if updown:
            raise ValueError("resblock_updown with spatial transformers is not supported")
        transformer = {"context_dim": int(arch["context_dim"]), "depth": int(arch.get("transformer_depth", 1)),
                       "heads": [int(arch["num_heads"]) if head_ch == -1 else w // head_ch for w in widths]}
    elif head_ch == -1:
        heads = int(arch.get("num_heads", 1))
        dims = {widths[i] // heads for i in attn} | {widths[-1] // heads}  # the middle block has attention too
        if len(dims) > 1:
            raise ValueError("num_head_channels=-1 with attention at levels of different widths cannot be expressed "
                             "with one attention_head_dim in UNet2DModel")
        head_ch = dims.pop()
    return {"sample_size": size, "in_channels": in_ch, "out_channels": out_ch, "widths": widths, "attn": attn,
            "num_res_blocks": int(arch["num_res_blocks"]), "head_ch": head_ch, "updown": updown,
            "transformer": transformer,
            "scale_shift": bool(arch.get("use_scale_shift_norm", False)),
            "new_order": bool(arch.get("use_new_attention_order", False)), "dropout": float(arch.get("dropout", 0.0))}


def unet_config(spec: dict) -> dict:
    """UNet2DModel keyword arguments equivalent to the spec; UNet2DConditionModel's with spatial transformers."""
    levels = range(len(spec["widths"]))
    if spec["transformer"]:
        t = spec["transformer"]
        return dict(sample_size=spec["sample_size"], in_channels=spec["in_channels"],
                    out_channels=spec["out_channels"], block_out_channels=tuple(spec["widths"]),
                    layers_per_block=spec["num_res_blocks"],
                    down_block_types=tuple("CrossAttnDownBlock2D" if i in spec["attn"] else "DownBlock2D"
                                           for i in levels),
                    mid_block_type="UNetMidBlock2DCrossAttn",
                    up_block_types=tuple("CrossAttnUpBlock2D" if i in spec["attn"] else "UpBlock2D"
                                         for i in reversed(levels)),
                    attention_head_dim=tuple(t["heads"]),  # diffusers reads it as the number of heads (issue 2011)
                    cross_attention_dim=t["context_dim"], transformer_layers_per_block=t["depth"],
                    use_linear_projection=False, upcast_attention=False, norm_num_groups=32, norm_eps=1e-5,
                    resnet_time_scale_shift="scale_shift" if spec["scale_shift"] else "default",
                    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
                    mid_block_scale_factor=1, dropout=spec["dropout"])
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if spec["updown"] else \
        ("DownBlock2D", "UpBlock2D")
    return dict(sample_size=spec["sample_size"], in_channels=spec["in_channels"], out_channels=spec["out_channels"],
                block_out_channels=tuple(spec["widths"]), layers_per_block=spec["num_res_blocks"],
                down_block_types=tuple("AttnDownBlock2D" if i in spec["attn"] else plain_down for i in levels),
                up_block_types=tuple("AttnUpBlock2D" if i in spec["attn"] else plain_up for i in reversed(levels)),
                attention_head_dim=spec["head_ch"], norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5,
                resnet_time_scale_shift="scale_shift" if spec["scale_shift"] else "default",
                downsample_type="resnet" if spec["updown"] else "conv",
                upsample_type="resnet" if spec["updown"] else "conv", downsample_padding=1,
                flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional", act_fn="silu",
                mid_block_scale_factor=1, dropout=spec["dropout"], add_attention=True)


def _unet_blocks(spec: dict) -> Iterator[tuple[str, str, str]]:
    """(checkpoint prefix, diffusers prefix, kind) for every block of the UNet; kind: resnet | attn | conv."""
    L, n, attn, updown = len(spec["widths"]), spec["num_res_blocks"], spec["attn"], spec["updown"]
    yield "input_blocks.0.0", "conv_in", "conv"
    k = 1
    for i in range(L):
        for j in range(n):
            yield f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", "resnet"
            if i in attn:
                yield f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", "attn"
            k += 1
        if i != L - 1:
            if updown:
                yield f"input_blocks.{k}.0", f"down_blocks.{i}.downsamplers.0", "resnet"
            else:
                yield f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv", "conv"
            k += 1
    yield "middle_block.0", "mid_block.resnets.0", "resnet"
    yield "middle_block.1", "mid_block.attentions.0", "attn"
    yield "middle_block.2", "mid_block.resnets.1", "resnet"
    m = 0
    for u, i in enumerate(reversed(range(L))):
        for j in range(n + 1):
            yield f"output_blocks.{m}.0", f"up_blocks.{u}.resnets.{j}", "resnet"
            idx = 1
            if i in attn:
                yield f"output_blocks.{m}.1", f"up_blocks.{u}.attentions.{j}", "attn"
                idx = 2
            if i != 0 and j == n:
                if updown:
                    yield f"output_blocks.{m}.{idx}", f"up_blocks.{u}.upsamplers.0", "resnet"
                else:
                    yield f"output_blocks.{m}.{idx}.conv", f"up_blocks.{u}.upsamplers.0.conv", "conv"
            m += 1
    yield "time_embed.0", "time_embedding.linear_1", "conv"
    yield "time_embed.2", "time_embedding.linear_2", "conv"
    yield "out.0", "conv_norm_out", "conv"
    yield "out.2", "conv_out", "conv"


class _Source:
    """A state dict with a prefix; remembers which keys were taken."""

    def __init__(self, sd: dict[str, torch.Tensor], prefix: str = ""):
        self.sd, self.prefix = sd, prefix
        self.keys = {k for k in sd if k.startswith(prefix)}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return self.prefix + key in self.sd

    def take(self, key: str) -> torch.Tensor:
        full = self.prefix + key
        if full not in self.sd:
            raise KeyError(f"checkpoint has no tensor {full}")
        self.used.add(full)
        return self.sd[full]

    def unused(self) -> list[str]:
        return sorted(self.keys - self.used)


def _copy(src: _Source, dst: dict, a: str, b: str) -> None:
    for p in ("weight", "bias"):
        if src.has(f"{a}.{p}"):
            dst[f"{b}.{p}"] = src.take(f"{a}.{p}")


def _attention(src: _Source, dst: dict, a: str, b: str, head_ch: int, new_order: bool) -> None:
    """Fused qkv 1x1 conv (3C, C, 1) -> to_q / to_k / to_v linear layers (C, C), proj_out -> to_out.0."""
    _copy(src, dst, f"{a}.norm", f"{b}.group_norm")
    w, bias = src.take(f"{a}.qkv.weight"), src.take(f"{a}.qkv.bias")
    c = w.shape[1]
    heads = c // head_ch
    if new_order:  # [q | k | v], each split into heads
        parts_w, parts_b = w.reshape(3, c, c), bias.reshape(3, c)
    else:  # legacy: per head [q, k, v]
        parts_w = w.reshape(heads, 3, head_ch, c).transpose(0, 1).reshape(3, c, c)
        parts_b = bias.reshape(heads, 3, head_ch).transpose(0, 1).reshape(3, c)
    for s, name in enumerate(("to_q", "to_k", "to_v")):
        dst[f"{b}.{name}.weight"], dst[f"{b}.{name}.bias"] = parts_w[s].contiguous(), parts_b[s].contiguous()
    dst[f"{b}.to_out.0.weight"] = src.take(f"{a}.proj_out.weight").reshape(c, c)
    dst[f"{b}.to_out.0.bias"] = src.take(f"{a}.proj_out.bias")


def _transformer(src: _Source, dst: dict, a: str, b: str) -> None:
    """openaimodel SpatialTransformer -> Transformer2DModel: the same names below the block (norm, proj_in,
    transformer_blocks.N.{norm1, attn1, norm2, attn2, norm3, ff.net.0.proj, ff.net.2}, proj_out)."""
    head = src.prefix + a + "."
    for key in sorted(k for k in src.keys if k.startswith(head)):
        dst[f"{b}.{key[len(head):]}"] = src.take(key[len(src.prefix):])


def convert_unet_state(sd: dict[str, torch.Tensor], spec: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The diffusers state dict of an ADM / openaimodel UNet; every checkpoint tensor must be used."""
    src, out = _Source(sd, prefix), {}
    for a, b, kind in _unet_blocks(spec):
        if kind == "resnet":
            for ka, kb in RESNET.items():
                _copy(src, out, f"{a}.{ka}", f"{b}.{kb}")
        elif kind == "attn" and spec["transformer"]:
            _transformer(src, out, a, b)
        elif kind == "attn":
            _attention(src, out, a, b, spec["head_ch"], spec["new_order"])
        else:
            _copy(src, out, a, b)
    if src.unused():
        raise ValueError(f"checkpoint tensors not mapped (wrong architecture config?): {src.unused()[:8]}")
    return out


def vq_spec(first_stage: dict) -> dict:
    dd = first_stage["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ValueError("autoencoders with attention inside their levels (attn_resolutions) are not supported")
    return {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "widths": [dd["ch"] * m for m in dd["ch_mult"]],
            "num_res_blocks": dd["num_res_blocks"], "z_channels": dd["z_channels"], "resolution": dd["resolution"],
            "n_embed": first_stage["n_embed"], "embed_dim": first_stage["embed_dim"]}


def vq_config(spec: dict) -> dict:
    L = len(spec["widths"])
    return dict(in_channels=spec["in_channels"], out_channels=spec["out_channels"],
                down_block_types=("DownEncoderBlock2D",) * L, up_block_types=("UpDecoderBlock2D",) * L,
                block_out_channels=tuple(spec["widths"]), layers_per_block=spec["num_res_blocks"], act_fn="silu",
                latent_channels=spec["z_channels"], sample_size=spec["resolution"],
                num_vq_embeddings=spec["n_embed"], norm_num_groups=32, vq_embed_dim=spec["embed_dim"],
                scaling_factor=1.0, norm_type="group", mid_block_add_attention=True)


def _vae_attention(src: _Source, dst: dict, a: str, b: str) -> None:
    _copy(src, dst, f"{a}.norm", f"{b}.group_norm")
    for ka, kb in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        w = src.take(f"{a}.{ka}.weight")
        dst[f"{b}.{kb}.weight"] = w.reshape(w.shape[0], w.shape[1])
        dst[f"{b}.{kb}.bias"] = src.take(f"{a}.{ka}.bias")


def convert_vq_state(sd: dict[str, torch.Tensor], spec: dict, prefix: str = "first_stage_model.") -> dict:
    """The diffusers VQModel state dict of a taming / LDM VQ first stage."""
    src, out = _Source(sd, prefix), {}
    L, n = len(spec["widths"]), spec["num_res_blocks"]

    def resnet(a: str, b: str) -> None:
        for ka, kb in VAE_RESNET.items():
            _copy(src, out, f"{a}.{ka}", f"{b}.{kb}")

    for part in ("encoder", "decoder"):
        _copy(src, out, f"{part}.conv_in", f"{part}.conv_in")
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        _vae_attention(src, out, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        _copy(src, out, f"{part}.norm_out", f"{part}.conv_norm_out")
        _copy(src, out, f"{part}.conv_out", f"{part}.conv_out")
    for i in range(L):
        for j in range(n):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i != L - 1:
            _copy(src, out, f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        u = L - 1 - i  # diffusers' decoder starts at the lowest resolution
        for j in range(n + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}")
        if i != 0:
            _copy(src, out, f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv")
    for name in ("quant_conv", "post_quant_conv"):
        _copy(src, out, name, name)
    out["quantize.embedding.weight"] = src.take("quantize.embedding.weight")
    leftover = [k for k in src.unused() if not k.startswith(prefix + "loss.")]
    if leftover:
        raise ValueError(f"autoencoder tensors not mapped: {leftover[:8]}")
    return out


def class_spec(arch: dict) -> dict | None:
    """The latent-diffusion ClassEmbedder of a class-conditional LDM (``cond_stage_config`` with
    ``conditioning_key: crossattn``), None for an unconditional one."""
    cond = arch.get("cond_stage_config")
    if cond is None:
        return None
    if arch.get("conditioning_key") != "crossattn":
        raise ValueError(f"conditioning_key {arch.get('conditioning_key')!r}: only crossattn (the class embedding as "
                         f"the cross-attention context) is supported")
    return {"num_classes": int(cond["n_classes"]), "embed_dim": int(cond["embed_dim"])}


def convert_class_state(sd: dict[str, torch.Tensor], prefix: str = "cond_stage_model.") -> dict[str, torch.Tensor]:
    """The nn.Embedding state dict of a ClassEmbedder (its only tensor: embedding.weight, n_classes x embed_dim)."""
    src = _Source(sd, prefix)
    out = {"weight": src.take("embedding.weight")}
    if src.unused():
        raise ValueError(f"class-embedder tensors not mapped: {src.unused()[:8]}")
    return out


def _build(cls: type, config: dict, state: dict | None, device: str | torch.device):
    """A model of the class and config; with ``state`` (cast to float32) loaded strictly (no missing or
    unexpected keys), random weights without."""
    with torch.device(device):
        net = cls(**config)
    if state is not None:
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=device == "meta")
    return net.eval()


def build_unet(spec: dict, state: dict | None = None, device: str | torch.device = "cpu"):
    from diffusers import UNet2DConditionModel, UNet2DModel

    return _build(UNet2DConditionModel if spec["transformer"] else UNet2DModel, unet_config(spec), state, device)


def build_vq(spec: dict, state: dict | None = None, device: str | torch.device = "cpu"):
    from diffusers import VQModel

    return _build(VQModel, vq_config(spec), state, device)


def build_class_embedding(spec: dict, state: dict | None = None, device: str | torch.device = "cpu"):
    return _build(torch.nn.Embedding, {"num_embeddings": spec["num_classes"], "embedding_dim": spec["embed_dim"]},
                  state, device)


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


Parts = tuple[dict[str, Any], Any, dict[str, Any]]


def adm_parts(arch: dict, sd: dict[str, torch.Tensor] | None = None) -> Parts:
    """(modules, scheduler, denoiser.json fields) of an ADM pixel model: the UNet with the weights of the
    guided-diffusion state dict ``sd`` (random without), its linear beta schedule, sigma_mapping vp."""
    from diffusers import DDPMScheduler

    spec = unet_spec(arch)
    unet = build_unet(spec, None if sd is None else convert_unet_state(sd, spec))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return {"unet": unet}, sched, {"kind": "pixel", "image_shape": [3, spec["sample_size"], spec["sample_size"]],
                                   "sigma_mapping": "vp", "eps_channels": 3}


def ldm_parts(arch: dict, sd: dict[str, torch.Tensor] | None = None) -> Parts:
    """(modules, scheduler, denoiser.json fields) of an LDM: UNet and VQ first stage with the weights of the
    latent-diffusion state dict ``sd`` (random without), and the model's own sqrt-linear schedule (linear_start ->
    linear_end), checked against the state dict's ``alphas_cumprod`` when present; latent_scale is its
    ``scale_factor`` (1 for VQ-f4).

    A class-conditional LDM (``cond_stage_config``: the ImageNet cin256) adds its ClassEmbedder as the module
    ``class_embedding`` (an nn.Embedding) and ``class_conditional`` to the fields: the number of classes and the
    unconditional class, the last one (cin256: 1001 classes, class 1000, which the official DAPS feeds)."""
    from diffusers import DDPMScheduler

    spec, vspec, cspec = unet_spec(arch["unet_config"]), vq_spec(arch["first_stage_config"]), class_spec(arch)
    given = sd or {}
    if cspec is None and any(k.startswith("cond_stage_model.") for k in given):
        raise ValueError("the checkpoint is class-conditional (cond_stage_model.*) but the architecture has no "
                         "cond_stage_config (see configs/model/imagenet256ldm.yaml)")
    if (cspec is None) != (spec["transformer"] is None):
        raise ValueError("a class-conditional LDM needs both cond_stage_config and a cross-attention UNet (context_dim)")
    if cspec and cspec["embed_dim"] != spec["transformer"]["context_dim"]:
        raise ValueError(f"the class embedding's embed_dim {cspec['embed_dim']} differs from the UNet's context_dim "
                         f"{spec['transformer']['context_dim']}")
    unet = build_unet(spec, None if sd is None else convert_unet_state(sd, spec, "model.diffusion_model."))
    vq = build_vq(vspec, None if sd is None else convert_vq_state(sd, vspec))
    modules: dict[str, Any] = {"unet": unet, "vqvae": vq}
    extra: dict[str, Any] = {}
    if cspec:
        modules["class_embedding"] = build_class_embedding(cspec, None if sd is None else convert_class_state(sd))
        extra["class_conditional"] = {"num_classes": cspec["num_classes"],
                                      "unconditional_class": cspec["num_classes"] - 1}
    sched = DDPMScheduler(num_train_timesteps=int(arch.get("timesteps", 1000)), beta_schedule="scaled_linear",
                          beta_start=float(arch.get("linear_start", 0.0015)), beta_end=float(arch.get("linear_end", 0.0195)))
    if "alphas_cumprod" in given and not torch.allclose(given["alphas_cumprod"].double(), sched.alphas_cumprod.double(),
                                                     rtol=1e-4, atol=1e-6):
        raise ValueError("its alphas_cumprod differ from the sqrt-linear schedule in the config")
    scale = float(given["scale_factor"]) if "scale_factor" in given else float(arch.get("scale_factor", 1.0))
    return modules, sched, {
        "kind": "latent", "image_shape": [vspec["in_channels"], vspec["resolution"], vspec["resolution"]],
        "sigma_mapping": "schedule", "autoencoder": "vq", "latent_scale": scale, **extra}


PARTS = {"adm": adm_parts, "ldm": ldm_parts}


def convert(kind: str, checkpoint: Path, arch: dict, out: Path, allow_unsafe_pickle: bool = False) -> Path:
    """An official checkpoint of ``kind`` (adm: a guided-diffusion state dict; ldm: {'state_dict': ...}, class-
    conditional when ``arch`` has a cond_stage_config) -> a diffusers folder (unet/, [vqvae/,] scheduler/,
    [class_embedding.safetensors,] denoiser.json with the checkpoint's stamp)."""
    ckpt = load_checkpoint(checkpoint, allow_unsafe_pickle)
    try:
        modules, scheduler, meta = PARTS[kind](arch, ckpt.get("state_dict", ckpt))
    except ValueError as err:
        raise ValueError(f"{checkpoint}: {err}") from err
    write_folder(out, modules, scheduler, {**meta, "source": _source_stamp(checkpoint)})
    log.info("converted %s -> %s", checkpoint, out)
    return out


def write_folder(out: Path, modules: dict, scheduler: Any, meta: dict) -> None:
    """A model folder for +model.name=diffusers, written beside ``out`` and then moved into place. Diffusers
    models go to their subfolder; an nn.Embedding (the class embedding) to ``<name>.safetensors``."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub, module in modules.items():
        if isinstance(module, torch.nn.Embedding):
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{sub}.safetensors")
        else:
            module.save_pretrained(tmp / sub, safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "denoiser.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def cached_conversion(kind: str, checkpoint: Path, arch: dict, cache: Path, allow_unsafe_pickle: bool = False) -> Path:
    """The converted folder for ``checkpoint``, converting it first unless the cache matches the file."""
    meta = cache / "denoiser.json"
    if meta.is_file():
        source = json.loads(meta.read_text()).get("source", {})
        if not checkpoint.is_file() or source == _source_stamp(checkpoint):
            return cache
        log.info("%s changed since it was converted: converting again", checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint.resolve()} (and no converted copy at "
                                f"{cache.resolve()})")
    return convert(kind, checkpoint, arch, cache, allow_unsafe_pickle)
