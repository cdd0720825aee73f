"""scripts/half_range.py: the networks under float16 autocast against float32, every float16 value inside them
checked against 65504 (residual sums included), a model whose values overflow flagged (exit status 1)."""
import subprocess
import sys
from pathlib import Path

import torch

from scripts.half_range import Peaks, load_model, measure, report

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_latent_prior_fits_float16():
    r = subprocess.run([sys.executable, "scripts/half_range.py", "--model", "checkpoints/fmnist32_ldm", "--n", "2",
                        "--sigmas", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith(("| decoder", "| unet"))]
    assert [row[:2] for row in rows] == [["| unet", "forward"], ["| decoder", "forward"], ["| decoder", "backward"]]
    assert all(0 < float(row[6]) < 0.05 for row in rows)  # float16 outputs close to float32's
    assert "% of " in rows[2][7] and "every peak is more than 16x below 65504" in r.stdout


def test_a_float16_overflow_is_flagged(pixel_model_dir):
    model = load_model(str(ROOT / "checkpoints" / "fmnist32_ldm"), torch.device("cpu"))
    images = torch.rand(2, *model.image_shape) * 2 - 1
    peaks, errors = measure(model, images, [1.0])
    assert not report(peaks, errors, margin=16.0)[1]
    with torch.no_grad():
        model.autoencoder.decoder.conv_out.weight.mul_(1e4)  # the image's scale: past 65504 in float16
    table, flagged = report(*measure(model, images, [1.0]), margin=16.0)
    assert flagged and "(flagged)" in table.split("| decoder | forward |")[1].splitlines()[0]
    assert "bfloat16 or float32" in table
    pixel = load_model(str(pixel_model_dir), torch.device("cpu"))
    table, flagged = report(*measure(pixel, torch.rand(2, *pixel.image_shape) * 2 - 1, [10.0, 0.1]), margin=16.0)
    assert [line.split(" | ")[:2] for line in table.splitlines()[2:] if line.startswith("| ")] == [["| unet", "forward"]]


def test_peaks_keep_the_largest_float16_value_and_a_non_finite_one():
    peaks = Peaks()
    key = ("decoder", "backward")
    peaks.record(key, "a", torch.tensor([1.0, -3.0], dtype=torch.float16))
    peaks.record(key, "b", torch.tensor([100.0], dtype=torch.float32))  # float32: not a float16 value
    peaks.record(key, "c", torch.tensor([2.0, 1e-6, 0.0], dtype=torch.float16))
    assert peaks.peak[key][:2] == (3.0, "a") and peaks.tiny["decoder"] == [1, 4]  # 1e-6 of 4 nonzero entries
    peaks.record(key, "d", torch.tensor([float("inf")]))
    peaks.record(key, "e", torch.tensor([5.0], dtype=torch.float16))
    assert peaks.peak[key][1] == "d"


def test_a_residual_sum_beyond_its_layers_is_the_peak():
    """An elementwise sum after a convolution runs in float16 under autocast: it is seen, with its module."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1, bias=False)
            torch.nn.init.ones_(self.conv.weight)

        def forward(self, x):
            h = self.conv(x)
            return h + 1000 * h

    peaks, net = Peaks(), Block()
    handles = peaks.hook("unet", net)
    with torch.no_grad(), peaks, torch.autocast("cpu", dtype=torch.float16):
        net(torch.full((1, 1, 2, 2), 2.0))
    for h in handles:
        h.remove()
    assert peaks.peak[("unet", "forward")][:2] == (2002.0, "add.Tensor")  # the conv's output was 2
