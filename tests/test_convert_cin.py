"""The class-conditional ImageNet LDM (cin256): conversion into UNet2DConditionModel + VQModel + class embedding,
checked on the reference fixture ldm_cin_tiny (../shared/fixtures/checkpoints, see its .json) and the full-size key
manifest; class labels (default, per row, per image from a file)."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from cores import convert
from cores.models import ClassConditionalEps, ScheduleTimesteps, VPTimesteps, build_model
from tests.test_convert import FIX, ROOT, fixture_arch, manifest_state, model_config, rel

pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f"fixtures not found at {FIX}")
NAME = "ldm_cin_tiny"


@pytest.fixture(scope="module")
def io():
    return torch.load(FIX / f"{NAME}_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def cin_cfg(tmp_path_factory):
    """The model config of the fixture as configs/model/imagenet256ldm.yaml gives it (converted on first use)."""
    cfg = dict(model_config("imagenet256ldm"), checkpoint=str(FIX / f"{NAME}.ckpt"), architecture=fixture_arch(NAME),
               converted=str(tmp_path_factory.mktemp("cin") / "converted"))
    build_model(cfg)  # converts once; the tests below load the cached folder
    return cfg


def test_unet_and_class_context_match_the_reference(cin_cfg, io):
    """UNet output for the four (z, t, label) rows (labels 1000, 1000, 3, 517) and the class context."""
    model = build_model(cin_cfg)
    assert isinstance(model.unet, ClassConditionalEps) and model.class_conditional
    model.condition(io["labels"])
    with torch.no_grad():
        assert rel(model.unet.context(4), io["context"]) < 1e-5
        assert rel(model.unet.eps(io["z"], io["timesteps"].float()), io["unet_out"]) < 1e-5


def test_decode_and_encode_match_the_reference(cin_cfg, io):
    model = build_model(cin_cfg)
    raw = build_model(dict(cin_cfg, quantize=False))
    with torch.no_grad():
        assert rel(model.decode(io["z"]), io["decoded"]) < 1e-5
        assert rel(raw.decode(io["z"]), io["decoded_without_quantize"]) < 1e-5
        assert rel(model.encode(io["image"]), io["encoded"]) < 1e-5


def test_official_denoiser_matches_at_three_sigmas(cin_cfg, io):
    """sigma_mapping daps_official, default class 1000: the timestep of each sigma, the UNet output inside the
    denoiser (at sigma 0.05 the denoised latent is almost z) and D(z, sigma)."""
    model = build_model(dict(cin_cfg, sigma_mapping="daps_official"))
    assert isinstance(model.unet.timesteps, VPTimesteps) and model.unet.class_label == 1000
    with torch.no_grad():
        for j, sigma in enumerate(io["sigma"].tolist()):
            t = model.unet.timesteps.timestep(sigma)
            assert t == pytest.approx(float(io["denoiser_timesteps"][j]), rel=1e-5)
            eps = model.unet.eps(io["z"] / (1 + sigma**2) ** 0.5, torch.full((4,), t))
            assert rel(eps, io["denoiser_unet_out"][j]) < 1e-5
            assert rel(model.denoise(io["z"], sigma), io["denoised"][j]) < 1e-5


def test_schedule_mapping_uses_the_checkpoint_betas(cin_cfg, io):
    """The default sigma_mapping: the checkpoint's own sqrt-linear schedule, D = z - sigma eps(c_in z, t(sigma))."""
    model = build_model(cin_cfg)
    assert isinstance(model.unet.timesteps, ScheduleTimesteps)
    t = model.unet.timesteps.timestep(1.0)
    assert t != pytest.approx(float(io["denoiser_timesteps"][1]), abs=1.0)
    with torch.no_grad():
        eps = model.unet.eps(io["z"] / 2**0.5, torch.full((4,), t))
        torch.testing.assert_close(model.denoise(io["z"], 1.0), io["z"] - eps)


def test_class_labels_default_override_per_row_and_from_a_file(cin_cfg, io, tmp_path):
    model = build_model(cin_cfg)
    weight = model.unet.embedding.weight
    z = io["z"]
    with torch.no_grad():
        default = model.denoise(z, 1.0)
        model.condition([1000] * 4)
        torch.testing.assert_close(model.denoise(z, 1.0), default)
        model.condition(3)  # one label for every row
        three = model.denoise(z, 1.0)
        torch.testing.assert_close(build_model(dict(cin_cfg, class_label=3)).denoise(z, 1.0), three)
        model.condition(torch.tensor([3, 1000, 3, 1000]))
        rows = model.denoise(z, 1.0)
        torch.testing.assert_close(rows[0::2], three[0::2])
        torch.testing.assert_close(rows[1::2], default[1::2])
        with pytest.raises(ValueError, match="batch has 2 rows"):
            model.denoise(z[:2], 1.0)
        model.condition(None)
        torch.testing.assert_close(model.denoise(z, 1.0), default)
    torch.testing.assert_close(model.unet.context(2), weight[1000].expand(2, 1, -1))
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        model.condition([1001])
    (tmp_path / "labels.json").write_text(json.dumps({"00000.png": 3, "00001": 517, "7": 12}))
    (tmp_path / "labels.csv").write_text("image,label\n00000.png,3\n00001,517\n7,12\n")
    for name in ("labels.json", "labels.csv"):
        labelled = build_model(dict(cin_cfg, class_labels_file=str(tmp_path / name)))
        labels = labelled.image_labels([0, 1, 7], ["00000.png", "00001.png", "b.png"])
        assert labels.tolist() == [3, 517, 12]
        with pytest.raises(KeyError, match="image 2"):
            labelled.image_labels([2], ["00002.png"])
    assert model.image_labels([0, 1], ["a.png", "b.png"]).tolist() == [1000, 1000]


def test_convert_script_and_cache_stamp(tmp_path, io):
    """scripts/convert_checkpoint.py writes the same folder: class_embedding.safetensors and the class fields."""
    cfg = dict(model_config("imagenet256ldm"), architecture=fixture_arch(NAME))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), "--config",
                        str(tmp_path / "m.yaml"), "--checkpoint", str(FIX / f"{NAME}.ckpt"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "denoiser.json").read_text())
    assert meta["class_conditional"] == {"num_classes": 1001, "unconditional_class": 1000}
    assert meta["source"]["path"] == str((FIX / f"{NAME}.ckpt").resolve())
    model = build_model({"name": "diffusers", "path": str(tmp_path / "out")})
    assert rel(model.unet.embedding.weight[io["labels"]][:, None], io["context"]) < 1e-5


def test_unconditional_config_for_a_conditional_checkpoint_is_refused():
    sd = torch.load(FIX / f"{NAME}.ckpt", weights_only=True)["state_dict"]
    arch = {k: v for k, v in fixture_arch(NAME).items() if k not in ("cond_stage_config", "conditioning_key")}
    with pytest.raises(ValueError, match="cond_stage_config"):
        convert.ldm_parts(arch, sd)


def test_full_size_cin256_manifest_maps_every_tensor():
    """Every tensor of the full cin256 maps with its shape: UNet2DConditionModel, VQModel and the class embedding
    load strictly (no missing, no unexpected keys) on the meta device."""
    arch = model_config("imagenet256ldm")["architecture"]
    sd = manifest_state("ldm_imagenet256_keys")
    spec, vspec, cspec = (convert.unet_spec(arch["unet_config"]), convert.vq_spec(arch["first_stage_config"]),
                          convert.class_spec(arch))
    state = convert.convert_unet_state(sd, spec, "model.diffusion_model.")
    unet = convert.build_unet(spec, state, device="meta")
    vq = convert.build_vq(vspec, convert.convert_vq_state(sd, vspec), device="meta")
    emb = convert.build_class_embedding(cspec, convert.convert_class_state(sd), device="meta")
    for k, v in unet.state_dict().items():
        assert v.shape == state[k].shape, k
    assert type(unet).__name__ == "UNet2DConditionModel" and unet.config.cross_attention_dim == 512
    assert vq.quantize.embedding.weight.shape == (8192, 3) and emb.weight.shape == (1001, 512)
    n = sum(p.numel() for p in unet.parameters())
    assert n == sum(torch.Size(s).numel() for k, s in json.loads((FIX / "ldm_imagenet256_keys.json").read_text())
                    .items() if k.startswith("model.diffusion_model."))



def test_compiled_class_conditional_unet_keeps_its_warm_up_trace(cin_cfg, io, eager_compile):
    """The warm-up runs with the default label (no per-row labels yet); sampling then conditions every row: the
    context has the same layout both ways, so the compiled UNet does not trace again inside sampling."""
    model = build_model(dict(cin_cfg, compile="default"))
    model.warm_up(4)
    traced = eager_compile["stats"]["unique_graphs"]
    model.condition(io["labels"])
    with torch.no_grad():
        model.denoise(io["z"], 1.0)
    assert eager_compile["stats"]["unique_graphs"] == traced, dict(eager_compile["stats"])
