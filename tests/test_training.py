"""The prior-training script's parts, on tiny data on the CPU."""
import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch

from training.data import fashion_mnist, gaussian_fields, power_law, radial_power_spectrum, random_fields, read_idx
from training.nets import build_autoencoder, build_unet, init_weights
from training.trainer import AutoencoderTask, DiffusionTask, LRSchedule, Trainer, encode_all


def tiny_images(n=64, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(4, 1, size, size, generator=g) * 2 - 1
    return base[torch.randint(0, 4, (n,), generator=g)] + 0.05 * torch.randn(n, 1, size, size, generator=g)


def ddpm_task(size=8, channels=1):
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    return DiffusionTask(build_unet(size, channels, (16, 32), 1, (1,), norm_num_groups=8),
                         DDPMScheduler(num_train_timesteps=100))


def trainer(task, out, epochs=6, **kw):
    x = tiny_images()
    kw = {"batch_size": 16, "lr": 2e-3, "show_progress": False, "ema_decay": 0.9, "patience": 100, **kw}
    return Trainer(task, x[8:], x[:8], out, epochs=epochs, **kw)


def test_ddpm_loss_falls_and_checkpoint_reloads_bit_exactly(tmp_path):
    from diffusers import UNet2DModel

    t = trainer(ddpm_task(), tmp_path, epochs=8)
    hist = t.fit().history
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert (tmp_path / "training_history.png").is_file()
    loaded = UNet2DModel.from_pretrained(tmp_path / "checkpoint_last" / "unet")
    with t.averaged():
        for k, v in t.task.net.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), k
    meta = json.loads((tmp_path / "checkpoint_last" / "denoiser.json").read_text())
    assert meta["kind"] == "pixel" and (tmp_path / "checkpoint_last" / "scheduler" / "scheduler_config.json").is_file()


def test_autoencoder_and_latent_ddpm_train(tmp_path):
    torch.manual_seed(0)
    ae = AutoencoderTask(build_autoencoder("vq", 1, 3, (8, 16, 16), 1, 32, norm_num_groups=8), "vq")
    hist = trainer(ae, tmp_path / "vq", epochs=6, lr=3e-3, ema_decay=None, sample_every=6, num_samples=4).fit().history
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert (tmp_path / "vq" / "samples" / "epoch_0006.png").is_file()
    x = tiny_images()
    z = encode_all(ae, x, 16, torch.device("cpu"))
    assert z.shape == (64, 3, 2, 2)
    scale = 1 / float(z.std())
    from diffusers import DDPMScheduler

    latent = DiffusionTask(build_unet(2, 3, (16, 16), 1, (), norm_num_groups=8), DDPMScheduler(num_train_timesteps=100),
                           ae.net, scale, "vq")
    t = Trainer(latent, z[8:] * scale, z[:8] * scale, tmp_path / "ldm", epochs=6, batch_size=16, lr=2e-3,
                show_progress=False, image_shape=[1, 8, 8], patience=100)
    hist = t.fit().history
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    from cores.models import build_model

    model = build_model({"name": "diffusers", "path": str(tmp_path / "ldm" / "checkpoint_last")})
    assert model.latent and model.image_shape == (1, 8, 8) and model.latent_scale == pytest.approx(scale)


def test_resume_continues_exactly(tmp_path):
    straight = trainer(ddpm_task(), tmp_path / "a", epochs=4, lr_schedule={"name": "cosine", "warmup_steps": 3})
    straight.fit()
    first = trainer(ddpm_task(), tmp_path / "b", epochs=4, lr_schedule={"name": "cosine", "warmup_steps": 3})
    first.epochs = 2  # stop after two epochs, as an interrupted run
    first.fit()
    resumed = trainer(ddpm_task(), tmp_path / "b", epochs=4, lr_schedule={"name": "cosine", "warmup_steps": 3})
    assert resumed.progress.epoch == 2
    resumed.fit()
    assert [r["lr"] for r in resumed.progress.history] == [r["lr"] for r in straight.progress.history]
    assert [r["train_loss"] for r in resumed.progress.history] == [r["train_loss"] for r in straight.progress.history]
    for a, b in zip(straight.task.net.parameters(), resumed.task.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_early_stopping_fires_on_a_flat_validation_loss(tmp_path, monkeypatch):
    t = trainer(ddpm_task(), tmp_path, epochs=20, patience=3, min_delta=1e-3)
    monkeypatch.setattr(t, "validate", lambda: 1.0)
    hist = t.fit().history
    assert len(hist) == 4 and hist[0]["new_best"] and not any(r["new_best"] for r in hist[1:])
    assert hist[-1]["early_stop_bad"] == 3


def test_clipping_bounds_the_gradient_norm(tmp_path):
    t = trainer(ddpm_task(), tmp_path, max_grad_norm=0.5)
    (t.task.loss(tiny_images()[:16], torch.Generator().manual_seed(0)) * 1e3).backward()
    before = t.clip()
    after = torch.norm(torch.stack([p.grad.norm() for p in t.params if p.grad is not None]))
    assert before > 0.5 and after <= 0.5 * (1 + 1e-5)


def test_lr_schedules():
    kw = dict(base_lr=1.0, total_steps=100, steps_per_epoch=10, warmup_steps=10)
    cos = LRSchedule("cosine", min_ratio=0.1, **kw)
    assert cos.lr(0) == pytest.approx(0.1) and cos.lr(9) == pytest.approx(1.0) and cos.lr(99) == pytest.approx(0.1, abs=2e-3)
    assert LRSchedule("exponential", gamma=0.5, **kw).lr(35) == pytest.approx(0.125)
    assert LRSchedule("multistep", gamma=0.1, milestones=[3, 6], **kw).lr(65) == pytest.approx(0.01)
    plateau = LRSchedule("plateau", patience=2, factor=0.5, **kw)
    for v in (1.0, 1.0, 1.0):
        plateau.epoch_end(v)
    assert plateau.lr(50) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        LRSchedule("linear", **kw)


@pytest.mark.parametrize("scheme", ["kaiming", "xavier", "orthogonal", "small"])
def test_init_schemes(scheme):
    net = build_unet(8, 1, (16, 32), 1, (), norm_num_groups=8)
    before = net.conv_in.weight.clone()
    init_weights(net, scheme)
    assert not torch.equal(before, net.conv_in.weight)
    if scheme == "small":
        assert net.conv_out.weight.abs().sum() == 0


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        trainer(ddpm_task(), tmp_path, precision="fp16")


def test_gaussian_fields_match_their_target_spectrum():
    """The generator itself: 400 fields of 32x32, mean |log10 P_measured / P_target| over k < 0.03."""
    x = gaussian_fields(400, 32, 2.0, torch.Generator().manual_seed(0))
    k, p = radial_power_spectrum(x)
    target = torch.stack([power_law(32, 2.0)[(torch.fft.fftfreq(32, 1 / 32)[:, None] ** 2 + torch.fft.fftfreq(
        32, 1 / 32)[None] ** 2).sqrt().round().long() == int(i)].mean() for i in k])
    assert float((p.log10() - target.log10()).abs().mean()) < 0.03
    assert float((p.log10() - target.log10()).abs().max()) < 0.1
    ln = random_fields(200, 32, "lognormal", seed=1)
    assert ln.min() >= -1 and ln.max() <= 1 and abs(float(ln.mean())) < 0.05


def test_idx_reader_and_fashion_mnist_padding(tmp_path):
    imgs = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 28, 28) + imgs.tobytes())
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    x = fashion_mnist("train", str(tmp_path))
    assert x.shape == (2, 1, 32, 32) and float(x[0, 0, 0, 0]) == -1.0
    assert math.isclose(float(x[0, 0, 2, 2]), 0 / 127.5 - 1) and float(x[1, 0, 29, 29]) == pytest.approx(
        float(imgs[1, 27, 27]) / 127.5 - 1)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("test", str(tmp_path))
