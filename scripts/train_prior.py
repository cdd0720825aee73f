"""Train a diffusion prior (or the autoencoder of a latent prior) with a Hydra config from configs/train/.

    python scripts/train_prior.py --config-name fmnist32_ddpm              # pixel DDPM on Fashion-MNIST 32x32
    python scripts/train_prior.py --config-name fmnist32_vq                # VQ autoencoder (downsampling 4)
    python scripts/train_prior.py --config-name fmnist32_ldm               # latent DDPM on the VQ latents
    python scripts/train_prior.py --config-name fields32_ddpm data.kind=lognormal

kind: ddpm | autoencoder | latent_ddpm. Every epoch logs one summary line; the run folder (out_dir) gets
checkpoint_last/, checkpoint_best/, training_history.png and samples/epoch_*.png; a run is resumed from
checkpoint_last/ when resume=true. With ``export`` set, checkpoint_best/ (without the training state) is
copied there with training_summary.json (command, device, wall time, losses). For random-field data the
radially averaged power spectrum of the samples is compared with the validation fields at each sampling.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import build_training_data, radial_power_spectrum, spectrum_mismatch  # noqa: E402
from training.nets import build_autoencoder, build_unet, init_weights  # noqa: E402
from training.trainer import AutoencoderTask, DiffusionTask, Trainer, encode_all  # noqa: E402
from utils.device import auto_device, device_info  # noqa: E402

log = logging.getLogger("train_prior")
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def noise_schedule(cfg: DictConfig):
    from diffusers import DDPMScheduler

    if cfg.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"schedule.beta_schedule must be linear or cosine, got {cfg.beta_schedule!r}")
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=BETA_SCHEDULES[cfg.beta_schedule],
                         beta_start=cfg.get("beta_start", 1e-4), beta_end=cfg.get("beta_end", 0.02),
                         clip_sample=False)


def unet_for(cfg: DictConfig, size: int, channels: int):
    m = OmegaConf.to_container(cfg.model, resolve=True)
    init = m.pop("init", "default")
    net = build_unet(sample_size=size, channels=channels, **m)
    init_weights(net, init)
    return net


def load_autoencoder(path: Path):
    from diffusers import AutoencoderKL, VQModel

    meta_path = path / "autoencoder.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no trained autoencoder at {path.resolve()} (autoencoder.json missing): train one "
                                f"first with --config-name fmnist32_vq")
    meta = json.loads(meta_path.read_text())
    cls, sub = (VQModel, "vqvae") if meta["kind"] == "vq" else (AutoencoderKL, "vae")
    return cls.from_pretrained(str(path / sub), use_safetensors=True, low_cpu_mem_usage=False).eval().requires_grad_(False), meta["kind"]


def spectrum_callback(out: Path, reference: torch.Tensor):
    """Plot and log the power spectrum of generated fields against the validation fields."""
    def on_samples(x: torch.Tensor, epoch: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k, pg = radial_power_spectrum(x)
        _, pr = radial_power_spectrum(reference)
        mismatch = spectrum_mismatch(x, reference)
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.loglog(k, pr, label="data (validation)")
        ax.loglog(k, pg, "--", label=f"generated ({len(x)})")
        ax.set_xlabel("k (cycles per box)")
        ax.set_ylabel("P(k)")
        ax.set_title(f"epoch {epoch}: mean |dlog10 P| = {mismatch:.3f}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "samples" / f"spectrum_epoch_{epoch:04d}.png", dpi=110)
        plt.close(fig)
        log.info("power spectrum: mean |log10 P_gen - log10 P_data| = %.4f (epoch %d)", mismatch, epoch)
        (out / "spectrum.json").write_text(json.dumps({"epoch": epoch, "mean_abs_dlog10_P": mismatch,
                                                       "k": k.tolist(), "P_data": pr.tolist(),
                                                       "P_generated": pg.tolist()}, indent=1))
    return on_samples


def build(cfg: DictConfig, device: torch.device) -> tuple[Trainer, dict]:
    kind, out = cfg.kind, Path(cfg.out_dir)
    t = cfg.train
    extra: dict = {}
    if kind == "latent_ddpm":
        ae, ae_kind = load_autoencoder(Path(cfg.autoencoder_path))
        ae = ae.to(device)
        images, images_val = build_training_data(OmegaConf.to_container(cfg.data, resolve=True))
        ae_task = AutoencoderTask(ae, ae_kind)
        z, z_val = (encode_all(ae_task, x, 512, device) for x in (images, images_val))
        scale = 1.0 / float(z.std())
        log.info("latents %s, std %.4f -> latent_scale %.4f", tuple(z.shape[1:]), 1 / scale, scale)
        train, val = z * scale, z_val * scale
        task = DiffusionTask(unet_for(cfg, z.shape[-1], z.shape[1]), noise_schedule(cfg.schedule), ae, scale, ae_kind)
        extra.update(image_shape=list(images.shape[1:]))
    else:
        train, val = build_training_data(OmegaConf.to_container(cfg.data, resolve=True))
        if kind == "ddpm":
            task = DiffusionTask(unet_for(cfg, train.shape[-1], train.shape[1]), noise_schedule(cfg.schedule))
        elif kind == "autoencoder":
            a = OmegaConf.to_container(cfg.autoencoder, resolve=True)
            ae_kind, kl_weight, init = a.pop("kind"), a.pop("kl_weight", 1e-6), a.pop("init", "default")
            net = build_autoencoder(ae_kind, train.shape[1], **a)
            init_weights(net, init)
            task = AutoencoderTask(net, ae_kind, kl_weight)
        else:
            raise ValueError(f"kind must be ddpm, autoencoder or latent_ddpm, got {kind!r}")
        if cfg.data.name == "fields" and kind == "ddpm":
            extra.update(on_samples=spectrum_callback(out, val))
    task.net.to(device)
    s = cfg.sampling
    trainer = Trainer(task, train, val, out, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                      weight_decay=t.weight_decay, lr_schedule=OmegaConf.to_container(t.lr_schedule, resolve=True),
                      patience=t.patience, min_delta=t.min_delta, max_grad_norm=t.max_grad_norm,
                      precision=t.precision, ema_decay=t.ema_decay, seed=cfg.seed, sample_every=s.every,
                      num_samples=s.num, ddim_steps=s.ddim_steps, ddim_eta=s.eta, resume=t.resume, device=device,
                      show_progress=cfg.show_progress, max_minutes=t.max_minutes, **extra)
    n_params = sum(p.numel() for p in task.net.parameters())
    log.info("%s: %s parameters, %d train / %d val items of %s, %d steps per epoch, device %s", kind,
             f"{n_params:,}", len(train), len(val), tuple(train.shape[1:]), trainer.steps_per_epoch, device)
    return trainer, {"parameters": n_params}


def export(cfg: DictConfig, trainer: Trainer, wall: float, device: torch.device, info: dict) -> None:
    dest = Path(cfg.export)
    src = Path(cfg.out_dir) / "checkpoint_best"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("training_state.pt"))
    h = trainer.progress.history
    best = min(h, key=lambda r: r["val_loss"])
    summary = {"command": "python " + " ".join(sys.argv), "device": device_info(device)["name"],
               "wall_sec_this_invocation": wall, "epochs_trained": len(h),
               "train_seconds_total": sum(r["seconds"] for r in h), "best_epoch": best["epoch"],
               "best_val_loss": best["val_loss"], "final_train_loss": h[-1]["train_loss"],
               "final_val_loss": h[-1]["val_loss"], **info, "config": OmegaConf.to_container(cfg, resolve=True)}
    (dest / "training_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("exported %s -> %s", src, dest)


@hydra.main(version_base="1.3", config_path="../configs/train", config_name="fmnist32_ddpm")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    device = auto_device() if cfg.device == "auto" else torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    try:
        trainer, info = build(cfg, device)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        sys.exit(2)
    trainer.fit()
    wall = time.perf_counter() - t0
    log.info("done in %.1f s", wall)
    if cfg.export:
        export(cfg, trainer, wall, device, info)


if __name__ == "__main__":
    main()
