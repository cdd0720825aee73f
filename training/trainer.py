"""Training loop for DDPM priors and autoencoders.

* tasks: :class:`DiffusionTask` (DDPM epsilon prediction, Ho et al. 2020 eq. 14, on images or on the
  latents of a frozen autoencoder) and :class:`AutoencoderTask` (VQModel or AutoencoderKL);
* AdamW; linear warmup, then cosine | exponential | multistep | plateau (:class:`LRSchedule`);
* gradient clipping, bf16 autocast or fp16 with a grad scaler, EMA of the weights;
* early stopping on the validation loss (patience, min_delta), computed with the EMA weights and a fixed
  random stream so that epochs are comparable;
* ``checkpoint_last/`` every epoch and ``checkpoint_best/`` on improvement, in diffusers format
  (safetensors, the EMA weights, the noise schedule beside them) plus ``training_state.pt`` (raw weights,
  EMA, optimizer, schedule, counters, history) for an exact resume; ``training_history.png``; sample grids.

Data order and noise come from generators seeded by (seed, epoch), so a resumed run continues exactly
as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)
SCHEDULES = ("cosine", "exponential", "multistep", "plateau", "constant")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DiffusionTask:
    """L = E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2 with t uniform on the training steps.

    For a latent model the data are latents (see :func:`encode_all`) and ``autoencoder`` (frozen) is saved
    beside the UNet and decodes the samples.
    """

    def __init__(self, net: torch.nn.Module, scheduler, autoencoder: torch.nn.Module | None = None,
                 latent_scale: float = 1.0, autoencoder_kind: str = "vq"):
        self.net, self.scheduler = net, scheduler
        self.autoencoder, self.latent_scale, self.autoencoder_kind = autoencoder, latent_scale, autoencoder_kind
        self.abar = scheduler.alphas_cumprod.float()

    def loss(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, len(self.abar), (x0.shape[0],), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        abar = self.abar.to(x0.device)[t].view(-1, 1, 1, 1)
        pred = self.net(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t).sample
        return torch.nn.functional.mse_loss(pred.float(), eps)

    def save(self, folder: Path, image_shape: list[int]) -> None:
        """unet/, scheduler/, denoiser.json (+ the autoencoder for a latent model)."""
        self.net.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        meta: dict[str, Any] = {"kind": "pixel", "image_shape": image_shape, "sigma_mapping": "schedule"}
        if self.autoencoder is not None:
            sub = "vqvae" if self.autoencoder_kind == "vq" else "vae"
            self.autoencoder.save_pretrained(folder / sub, safe_serialization=True)
            meta.update(kind="latent", autoencoder=self.autoencoder_kind, latent_scale=self.latent_scale)
        (folder / "denoiser.json").write_text(json.dumps(meta, indent=2))

    @torch.no_grad()
    def samples(self, n: int, steps: int, eta: float, generator: torch.Generator) -> torch.Tensor:
        """DDIM samples (Song et al. 2021), decoded for latent models; in [-1, 1]."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps)
        c, s = self.net.config.in_channels, self.net.config.sample_size
        dev = next(self.net.parameters()).device
        x = torch.randn(n, c, s, s, generator=generator, device=dev)
        for t in ddim.timesteps:
            eps = self.net(x, t.to(dev).expand(n)).sample
            x = ddim.step(eps, t, x, eta=eta, generator=generator).prev_sample
        if self.autoencoder is not None:
            dec = self.autoencoder.decode(x / self.latent_scale)
            x = dec.sample if hasattr(dec, "sample") else dec
        return x.clamp(-1, 1)


class AutoencoderTask:
    """L1 reconstruction + the VQ commitment loss (VQModel) or kl_weight * KL (AutoencoderKL)."""

    def __init__(self, net: torch.nn.Module, kind: str, kl_weight: float = 1e-6):
        self.net, self.kind, self.kl_weight = net, kind, kl_weight
        self.subfolder = "vqvae" if kind == "vq" else "vae"

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents (VQ) or posterior modes (KL)."""
        enc = self.net.encode(x)
        return enc.latents if self.kind == "vq" else enc.latent_dist.mode()

    def loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "vq":
            dec = self.net.decode(self.net.encode(x).latents)
            return (dec.sample.float() - x).abs().mean() + dec.commit_loss.float().mean()
        post = self.net.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator, device=x.device)
        return (self.net.decode(z).sample.float() - x).abs().mean() + self.kl_weight * post.kl().mean()

    def save(self, folder: Path, image_shape: list[int]) -> None:
        self.net.save_pretrained(folder / self.subfolder, safe_serialization=True)
        (folder / "autoencoder.json").write_text(json.dumps({"kind": self.kind, "image_shape": image_shape}, indent=2))

    @torch.no_grad()
    def samples(self, n: int, steps: int, eta: float, generator: torch.Generator, data: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Reconstructions of the first n validation images, interleaved with the originals."""
        x = data[:n]
        rec = self.net.decode(self.encode(x)).sample
        return torch.stack([x, rec.clamp(-1, 1)], 1).flatten(0, 1)


@torch.no_grad()
def encode_all(task: AutoencoderTask, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Latents of a whole dataset (CPU tensor)."""
    task.net.eval()
    return torch.cat([task.encode(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


@dataclass
class LRSchedule:
    """lr(step) = base_lr * warmup * decay.

    warmup: linear from 0 over ``warmup_steps``; decay (after warmup): cosine to ``min_ratio`` over the
    remaining steps, ``gamma`` per epoch (exponential), ``gamma`` at each epoch in ``milestones``
    (multistep), ``factor`` each time the validation loss has not improved for ``patience`` epochs
    (plateau), or 1 (constant).
    """

    name: str
    base_lr: float
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int = 0
    min_ratio: float = 0.0
    gamma: float = 0.95
    milestones: list[int] = field(default_factory=list)
    patience: int = 5
    factor: float = 0.5
    plateau_scale: float = 1.0
    plateau_best: float = math.inf
    plateau_bad: int = 0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"lr_schedule.name must be one of {', '.join(SCHEDULES)}, got {self.name!r}")

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        epoch = step // self.steps_per_epoch
        if self.name == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            decay = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        elif self.name == "exponential":
            decay = self.gamma**epoch
        elif self.name == "multistep":
            decay = self.gamma ** sum(epoch >= m for m in self.milestones)
        elif self.name == "plateau":
            decay = self.plateau_scale
        else:
            decay = 1.0
        return self.base_lr * decay

    def epoch_end(self, val_loss: float, min_delta: float = 0.0) -> None:
        """Plateau bookkeeping (the other schedules depend on the step only)."""
        if self.name != "plateau":
            return
        if val_loss < self.plateau_best - min_delta:
            self.plateau_best, self.plateau_bad = val_loss, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad >= self.patience:
                self.plateau_scale *= self.factor
                self.plateau_bad = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale, self.plateau_best, self.plateau_bad = (state["plateau_scale"], state["plateau_best"],
                                                                   state["plateau_bad"])


class EMA:
    """Exponential moving average of parameters, decay warmed up as min(decay, (1 + n) / (10 + n))."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - d)
        self.updates += 1

    @torch.no_grad()
    def swap(self, params: list[torch.Tensor]) -> None:
        """Exchange the model's weights and the averaged ones (call twice to restore)."""
        for p, s in zip(params, self.shadow, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Fits a task; see the module docstring. ``image_shape`` is written beside the saved model."""

    def __init__(self, task, train: torch.Tensor, val: torch.Tensor, out_dir: Path, *, epochs: int, batch_size: int,
                 lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 lr_schedule: dict | None = None, patience: int = 10, min_delta: float = 0.0,
                 max_grad_norm: float | None = 1.0, precision: str = "fp32", ema_decay: float | None = 0.999,
                 seed: int = 0, sample_every: int = 0, num_samples: int = 64, ddim_steps: int = 50, ddim_eta: float = 0.0,
                 resume: bool = True, device: torch.device | str = "cpu", show_progress: bool = True,
                 image_shape: list[int] | None = None, on_samples: Callable[[torch.Tensor, int], None] | None = None,
                 max_minutes: float | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision=fp16 needs CUDA (a grad scaler); use bf16 or fp32 on the CPU")
        self.task, self.out = task, Path(out_dir)
        self.train_x, self.val_x = train.to(self.device), val.to(self.device)
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.params = [p for p in task.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
        self.steps_per_epoch = max(1, len(train) // batch_size)
        self.schedule = LRSchedule(base_lr=lr, total_steps=epochs * self.steps_per_epoch,
                                   steps_per_epoch=self.steps_per_epoch, **(lr_schedule or {"name": "constant"}))
        self.patience, self.min_delta, self.max_grad_norm = patience, min_delta, max_grad_norm
        self.amp_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.ema = EMA(self.params, ema_decay) if ema_decay else None
        self.sample_every, self.num_samples, self.ddim_steps, self.ddim_eta = sample_every, num_samples, ddim_steps, ddim_eta
        self.show_progress, self.on_samples, self.max_minutes = show_progress, on_samples, max_minutes
        self.progress = Progress()
        self.image_shape = list(image_shape or train.shape[1:])
        if resume and (self.out / "checkpoint_last" / "training_state.pt").is_file():
            self.load(self.out / "checkpoint_last")

    def _generator(self, epoch: int, offset: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch * 7919 + offset)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.task.net.train()
        order = torch.randperm(len(self.train_x), generator=torch.Generator().manual_seed(self.seed + 31 * epoch))
        order = order.to(self.device)
        g = self._generator(epoch)
        losses, norms = [], []
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}", leave=False, disable=not self.show_progress)
        for i in bar:
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.train_x[idx]
            for group in self.opt.param_groups:
                group["lr"] = self.schedule.lr(self.progress.step)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.task.loss(x, g)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.opt)
            else:
                loss.backward()
            norm = self.clip()
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            if self.ema is not None:
                self.ema.update(self.params)
            self.progress.step += 1
            losses.append(loss.detach())
            norms.append(norm)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        return {"train_loss": float(torch.stack(losses).mean()), "grad_norm": float(torch.stack(norms).mean())}

    def clip(self) -> torch.Tensor:
        """Clip the global gradient norm to max_norm; returns the norm before clipping."""
        if self.max_grad_norm:
            return torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        return torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))

    @torch.no_grad()
    def validate(self) -> float:
        """Validation loss with the EMA weights and a fixed random stream (comparable across epochs)."""
        self.task.net.eval()
        g = self._generator(0, offset=12345)
        total, n = 0.0, 0
        with self.averaged():
            for i in range(0, len(self.val_x), self.batch_size):
                x = self.val_x[i:i + self.batch_size]
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    total += float(self.task.loss(x, g)) * len(x)
                n += len(x)
        return total / n

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Context in which the network holds its EMA weights."""
        if self.ema is not None:
            self.ema.swap(self.params)
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.swap(self.params)

    def fit(self) -> Progress:
        self.out.mkdir(parents=True, exist_ok=True)
        p = self.progress
        start = time.perf_counter()
        if p.epoch:
            log.info("resuming %s at epoch %d (step %d, best val %.5f)", self.out, p.epoch + 1, p.step, p.best_val)
        while p.epoch < self.epochs:
            t0 = time.perf_counter()
            stats = self.train_epoch(p.epoch)
            val = self.validate()
            self.schedule.epoch_end(val, self.min_delta)
            improved = val < p.best_val - self.min_delta
            if improved:
                p.best_val, p.bad_epochs = val, 0
            else:
                p.bad_epochs += 1
            p.epoch += 1
            record = {"epoch": p.epoch, **stats, "val_loss": val, "lr": self.schedule.lr(p.step - 1),
                      "seconds": time.perf_counter() - t0, "plateau_bad": self.schedule.plateau_bad,
                      "early_stop_bad": p.bad_epochs, "new_best": improved}
            p.history.append(record)
            log.info("epoch %d/%d | train %.5f | val %.5f | lr %.2e | %.1f s | grad %.3f | plateau %d/%d | "
                     "early stop %d/%d%s", p.epoch, self.epochs, stats["train_loss"], val, record["lr"],
                     record["seconds"], stats["grad_norm"], self.schedule.plateau_bad, self.schedule.patience,
                     p.bad_epochs, self.patience, " | new best" if improved else "")
            self.save(self.out / "checkpoint_last")
            if improved:
                shutil.rmtree(self.out / "checkpoint_best", ignore_errors=True)
                shutil.copytree(self.out / "checkpoint_last", self.out / "checkpoint_best")
            self.plot_history()
            if self.sample_every and (p.epoch % self.sample_every == 0 or p.epoch == self.epochs):
                self.sample_grid(p.epoch)
            if p.bad_epochs >= self.patience:
                log.info("early stopping: no improvement of val loss by %g for %d epochs", self.min_delta, self.patience)
                break
            if self.max_minutes and time.perf_counter() - start > 60 * self.max_minutes:
                log.info("time budget of %.1f min reached after epoch %d: stopping", self.max_minutes, p.epoch)
                if self.sample_every and p.epoch % self.sample_every:
                    self.sample_grid(p.epoch)
                break
        return p

    def save(self, folder: Path) -> None:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        raw = {k: v.detach().cpu().clone() for k, v in self.task.net.state_dict().items()}
        with self.averaged():
            self.task.save(tmp, self.image_shape)
        state = {"model": raw, "optimizer": self.opt.state_dict(), "schedule": self.schedule.state_dict(),
                 "progress": {k: v for k, v in asdict(self.progress).items() if k != "history"},
                 "history": json.dumps(self.progress.history)}
        if self.ema is not None:
            state["ema"] = {"shadow": [s.cpu() for s in self.ema.shadow], "updates": self.ema.updates}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, tmp / "training_state.pt")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
        self.task.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.progress = Progress(**state["progress"], history=json.loads(state["history"]))
        if self.ema is not None:
            self.ema.shadow = [s.to(self.device) for s in state["ema"]["shadow"]]
            self.ema.updates = state["ema"]["updates"]
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def plot_history(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.progress.history
        epochs = [r["epoch"] for r in h]
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        a.plot(epochs, [r["train_loss"] for r in h], label="train")
        a.plot(epochs, [r["val_loss"] for r in h], label="val (EMA)")
        a.set_yscale("log")
        a.set_xlabel("epoch")
        a.set_ylabel("loss")
        a.legend()
        b.plot(epochs, [r["lr"] for r in h])
        b.set_xlabel("epoch")
        b.set_ylabel("learning rate")
        fig.tight_layout()
        fig.savefig(self.out / "training_history.png", dpi=110)
        plt.close(fig)

    def sample_grid(self, epoch: int) -> None:
        from utils.images import save_grid

        self.task.net.eval()
        g = self._generator(epoch, offset=999)
        kwargs = {"data": self.val_x} if isinstance(self.task, AutoencoderTask) else {}
        with self.averaged():
            x = self.task.samples(self.num_samples, self.ddim_steps, self.ddim_eta, g, **kwargs).float().cpu()
        ncol = int(math.ceil(math.sqrt(len(x))))
        rows = [list(x[i:i + ncol]) for i in range(0, len(x), ncol)]
        (self.out / "samples").mkdir(exist_ok=True)
        save_grid(rows, self.out / "samples" / f"epoch_{epoch:04d}.png")
        if self.on_samples:
            self.on_samples(x, epoch)
