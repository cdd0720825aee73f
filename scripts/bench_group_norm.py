"""Time a group norm + SiLU + 3x3 convolution block, compiled, in bf16 autocast with channels_last (NHWC) tensors, with
torch's ``group_norm`` (diffusers' modules) and with :class:`cores.layout.LayoutGroupNorm`.

    python scripts/bench_group_norm.py [--shapes 40x128x256 10x128x256 ...] [--groups 32] [--dump DIR]

For each shape (N x C x H, square) it prints the forward without gradient (the UNet in the ODE) and the forward and
backward with respect to the input (the decoder in every LatentDAPS MCMC step): median ms of 20 CUDA-event timed
calls after 5 warm-ups, the largest difference from torch's block, and the bytes of the block's input and output
tensors per ms (a lower bound of the traffic). ``--dump DIR`` sets inductor's debug trace directory there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.layout import LayoutGroupNorm  # noqa: E402
from scripts.bench_unet import cuda_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["40x128x256", "40x256x64", "10x128x256", "10x512x64"])
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()
    if args.dump:
        import torch._inductor.config as inductor_config

        inductor_config.trace.enabled, inductor_config.trace.debug_dir = True, args.dump
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print("| N x C x H | norm | pass | ms | GB/s of inputs + outputs | max abs diff vs torch |\n"
          "|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for spec in args.shapes:
        n, c, size = (int(v) for v in spec.split("x"))
        norm = torch.nn.GroupNorm(args.groups, c, eps=1e-6).cuda()
        conv = torch.nn.Conv2d(c, c, 3, padding=1).cuda().to(memory_format=torch.channels_last)
        with torch.no_grad():
            norm.weight.normal_(generator=gen)
            norm.bias.normal_(generator=gen)
        ours = LayoutGroupNorm(args.groups, c, eps=1e-6).cuda()
        ours.load_state_dict(norm.state_dict())
        norms = {"torch": norm, "LayoutGroupNorm": ours}
        x = torch.randn(n, c, size, size, device="cuda", generator=gen, dtype=torch.bfloat16
                        ).to(memory_format=torch.channels_last)
        w = torch.randn(x.shape, device="cuda", generator=gen, dtype=x.dtype).to(memory_format=torch.channels_last)
        io_bytes = 2 * x.numel() * x.element_size()
        reference = {}
        for name, fn in norms.items():
            torch._dynamo.reset()  # a fresh compile per block: dynamo's recompile limit would leave later ones eager
            block = torch.compile(lambda t, fn=fn: conv(F.silu(fn(t))))

            def forward(block=block):
                with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                    return block(x)

            def backward(block=block):
                xg = x.detach().requires_grad_(True)
                with torch.autocast("cuda", torch.bfloat16):
                    y = block(xg)
                return torch.autograd.grad((y * w).sum(), xg)[0]

            for label, call, traffic in (("forward", forward, io_bytes), ("fwd+bwd", backward, 3 * io_bytes)):
                _, ms = cuda_ms(call)
                out = call().float()
                diff = (out - reference.setdefault(label, out)).abs().max().item()
                print(f"| {spec} | {name} | {label} | {ms:.3f} | {traffic / ms / 1e6:.0f} | {diff:.2e} |", flush=True)
        del x, w, conv
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
