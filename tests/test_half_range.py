"""scripts/half_range.py: the float32 peaks of each network's layers against float16's range, the decoder's backward
counted, a model whose values come near 65504 flagged (exit status 1)."""
import subprocess
import sys
from pathlib import Path

import torch

from scripts.half_range import load_model, measure, report

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_latent_prior_fits_float16():
    r = subprocess.run([sys.executable, "scripts/half_range.py", "--model", "checkpoints/fmnist32_ldm", "--n", "2",
                        "--sigmas", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| decoder", "| unet"))]
    assert [row.split(" | ")[:2] for row in rows] == [["| decoder", "backward"], ["| decoder", "forward"],
                                                      ["| unet", "forward"]]
    assert "% of " in rows[0] and "every peak is more than 16x below 65504" in r.stdout


def test_values_near_float16s_limit_are_flagged(pixel_model_dir):
    model = load_model(str(ROOT / "checkpoints" / "fmnist32_ldm"), torch.device("cpu"))
    images = torch.rand(2, *model.image_shape) * 2 - 1
    table, flagged = report(measure(model, images, [1.0]), margin=16.0)
    assert not flagged
    with torch.no_grad():
        model.autoencoder.decoder.conv_out.weight.mul_(1e4)  # the image's scale: a peak of about 1e4 x
    table, flagged = report(measure(model, images, [1.0]), margin=16.0)
    assert flagged and "| decoder | forward |" in table and "(flagged) | - |" in table and "bfloat16 or float32" in table
    pixel = load_model(str(pixel_model_dir), torch.device("cpu"))
    table, flagged = report(measure(pixel, torch.rand(2, *pixel.image_shape) * 2 - 1, [10.0, 0.1]), margin=16.0)
    assert [line.split(" | ")[:2] for line in table.splitlines()[2:] if line.startswith("| ")] == [["| unet", "forward"]]
