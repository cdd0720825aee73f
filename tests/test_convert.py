"""Conversion of the official checkpoints, checked on fixtures made with the reference implementations
(../shared/fixtures/checkpoints, see DESIGN.md) and on the full-size key manifests."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cores import convert
from cores.models import VPEpsDenoiser, VPTimesteps, build_model

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "checkpoints"
pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f"fixtures not found at {FIX}")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "model"


def rel(a, b):
    return float((a - b).norm() / b.norm())


def model_config(name):
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def fixture(name):
    return json.loads((FIX / f"{name}.json").read_text())


def fixture_arch(name):
    """The architecture config of a fixture checkpoint, as the model configs give it."""
    cfg = fixture(name)
    keys = ("unet_config", "first_stage_config", "cond_stage_config", "conditioning_key")
    return cfg["config"] if "config" in cfg else {k: cfg[k] for k in keys if k in cfg}


def test_adm_tiny_unet_and_vp_denoiser_match_the_reference(tmp_path):
    arch = fixture_arch("adm_tiny64")
    io = torch.load(FIX / "adm_tiny64_io.pt", weights_only=True)
    folder = convert.convert("adm", FIX / "adm_tiny64.pt", arch, tmp_path / "adm")
    model = build_model({"name": "diffusers", "path": str(folder)})
    with torch.no_grad():
        out = model.net(io["x"], io["timesteps"].float()).sample
        assert rel(out, io["unet_out"]) < 1e-5
        for i in range(2):
            d = model.denoise(io["x"][i:i + 1], float(io["sigma"][i]))
            assert rel(d, io["denoised"][i:i + 1]) < 1e-5
    assert isinstance(model, VPEpsDenoiser) and isinstance(model.timesteps, VPTimesteps) and model.eps_channels == 3


def test_ldm_tiny_unet_decode_encode_match_the_reference(tmp_path):
    io = torch.load(FIX / "ldm_vq_tiny_io.pt", weights_only=True)
    arch = fixture_arch("ldm_vq_tiny")
    folder = convert.convert("ldm", FIX / "ldm_vq_tiny.ckpt", arch, tmp_path / "ldm")
    model = build_model({"name": "diffusers", "path": str(folder)})
    raw = build_model({"name": "diffusers", "path": str(folder), "quantize": False})
    with torch.no_grad():
        assert rel(model.unet.net(io["z"], io["timesteps"].float()).sample, io["unet_out"]) < 1e-5
        assert rel(model.decode(io["z"]), io["decoded"]) < 1e-5
        assert rel(raw.decode(io["z"]), io["decoded_without_quantize"]) < 1e-5
        assert rel(model.encode(io["image"]), io["encoded"]) < 1e-5
    meta = json.loads((folder / "denoiser.json").read_text())
    assert meta["kind"] == "latent" and meta["latent_scale"] == 1.0 and meta["sigma_mapping"] == "schedule"
    official = build_model({"name": "diffusers", "path": str(folder), "sigma_mapping": "daps_official"})
    assert isinstance(official.unet.timesteps, VPTimesteps)
    assert model.unet.timesteps.timestep(1.0) != pytest.approx(official.unet.timesteps.timestep(1.0), abs=1.0)


def manifest_state(name):
    """Random tensors on the meta device, one per entry of a full-size key manifest."""
    return {k: torch.empty(v, device="meta") for k, v in json.loads((FIX / f"{name}.json").read_text()).items()}


@pytest.mark.parametrize("manifest, config", [("adm_ffhq256_keys", "ffhq256ddpm"),
                                              ("adm_imagenet256_keys", "imagenet256ddpm")])
def test_full_size_adm_manifests_map_every_tensor(manifest, config):
    arch = model_config(config)["architecture"]
    spec = convert.unet_spec(arch)
    state = convert.convert_unet_state(manifest_state(manifest), spec)
    net = convert.build_unet(spec, state, device="meta")  # strict: no missing, no unexpected keys
    for k, v in net.state_dict().items():
        assert v.shape == state[k].shape, k


def test_full_size_ldm_manifest_maps_every_tensor():
    arch = model_config("ffhq256ldm")["architecture"]
    sd = manifest_state("ldm_ffhq256_keys")
    spec, vspec = convert.unet_spec(arch["unet_config"]), convert.vq_spec(arch["first_stage_config"])
    unet = convert.build_unet(spec, convert.convert_unet_state(sd, spec, "model.diffusion_model."), device="meta")
    vq = convert.build_vq(vspec, convert.convert_vq_state(sd, vspec), device="meta")
    assert sum(p.numel() for p in unet.parameters()) > 2e8 and vq.quantize.embedding.weight.shape == (8192, 3)


def test_wrong_architecture_is_reported():
    arch = dict(fixture_arch("adm_tiny64"), num_res_blocks=2)
    sd = torch.load(FIX / "adm_tiny64.pt", weights_only=True)
    with pytest.raises((KeyError, ValueError)):
        convert.convert_unet_state(sd, convert.unet_spec(arch))


def test_class_conditional_adm_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="class_cond"):
        convert.unet_spec(dict(fixture_arch("adm_tiny64"), class_cond=True))


def test_unsafe_pickles_need_the_opt_in(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "callback": Payload()}, path)
    with pytest.raises(ValueError, match="allow_unsafe_pickle=true"):
        convert.load_checkpoint(path)
    assert "callback" in convert.load_checkpoint(path, allow_unsafe_pickle=True)


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_checkpoint_says_download_again_not_unsafe_pickle(tmp_path, damage):
    """A truncated .pt (PytorchStreamReader error) or random bytes: one line naming the file, no pickle opt-in advice,
    even with the opt-in given."""
    path = tmp_path / "model.ckpt"
    if damage == "truncated":
        torch.save({"state_dict": {"w": torch.randn(64, 64)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    for opt_in in (False, True):
        with pytest.raises(ValueError) as err:
            convert.load_checkpoint(path, allow_unsafe_pickle=opt_in)
        msg = str(err.value)
        assert str(path) in msg and "damaged" in msg and "download it again" in msg and "\n" not in msg
        assert "unsafe" not in msg and "allow_unsafe_pickle" not in msg


def test_intact_files_are_not_called_damaged(tmp_path):
    """checkpoint_damage: None for intact zip (also without CRC-32s) and legacy torch.save files, and for an unsafe
    pickle; a zip whose data.pkl is cut short is damaged."""
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"w": torch.ones(3)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(3), "callback": Payload()}, tmp_path / "evil.pt")
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.ones(3)}, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(crc)
    for name in ("zip.pt", "legacy.pt", "evil.pt", "nocrc.pt"):
        assert convert.checkpoint_damage(tmp_path / name) is None, name
    data = bytearray((tmp_path / "zip.pt").read_bytes())
    start = data.index(b"data.pkl") + len(b"data.pkl")  # the local header's name; its padding and the pickle follow
    data[start:start + 200] = bytes(200)
    (tmp_path / "cut.pt").write_bytes(bytes(data))
    assert "does not parse" in convert.checkpoint_damage(tmp_path / "cut.pt")
    assert convert.load_checkpoint(tmp_path / "legacy.pt")["w"].sum() == 3


def test_missing_checkpoint_names_path_and_source(tmp_path):
    cfg = model_config("ffhq256ddpm")
    cfg.update(checkpoint=str(tmp_path / "ffhq256.pt"), converted=str(tmp_path / "conv"))
    with pytest.raises(FileNotFoundError) as err:
        build_model(cfg)
    assert str(tmp_path / "ffhq256.pt") in str(err.value) and "drive.google.com" in str(err.value)


def test_on_the_fly_conversion_is_cached(tmp_path):
    arch = fixture_arch("adm_tiny64")
    cfg = {"name": "adm", "checkpoint": str(FIX / "adm_tiny64.pt"), "architecture": arch,
           "converted": str(tmp_path / "cache")}
    build_model(cfg)
    stamp = (tmp_path / "cache" / "denoiser.json").stat().st_mtime_ns
    build_model(cfg)
    assert (tmp_path / "cache" / "denoiser.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name, kind", [("adm_tiny64", "adm"), ("ldm_vq_tiny", "ldm"), ("ldm_cin_tiny", "ldm")])
def test_random_model_is_an_identity_denoiser(tmp_path, name, kind):
    """scripts/make_random_model.py: the parts of a conversion with random weights and a zero output conv (the
    class-conditional LDM with its class embedding)."""
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"name": kind, "architecture": fixture_arch(name)}))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_model.py"), "--config",
                        str(tmp_path / "m.yaml"), "--out", str(tmp_path / "rand")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    model = build_model({"name": "diffusers", "path": str(tmp_path / "rand")})
    x = torch.randn(2, *model.in_shape)
    with torch.no_grad():
        d = model.unet.denoise(x, 1.0) if kind == "ldm" else model.denoise(x, 1.0)
    torch.testing.assert_close(d, x)
    assert json.loads((tmp_path / "rand" / "denoiser.json").read_text())["random_weights"] is True
    assert model.class_conditional == (tmp_path / "rand" / "class_embedding.safetensors").is_file() == ("cin" in name)
