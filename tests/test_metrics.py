"""Metrics: PSNR/SSIM, the NaN guard, LPIPS offline (unavailable with a reason, or checked against the reference)."""
import io
import os
import pickle
import warnings

import pytest
import torch

import scripts.fetch_lpips_weights as fetch
from utils.metrics import Evaluator, alexnet_weights_path, load_lpips


def test_psnr_ssim_and_clamping():
    ev = Evaluator(["psnr", "ssim"], torch.device("cpu"), (1, 16, 16))
    gt = torch.zeros(2, 1, 16, 16)
    x = gt.clone()
    x[1] += 0.2  # [-1,1] offset 0.2 = 0.1 in [0,1]: mse 0.01 -> 20 dB
    out = ev(gt, x)
    assert out["psnr"][1] == pytest.approx(20.0, abs=1e-3) and out["psnr"][0] > 60
    assert out["ssim"][0] == pytest.approx(1.0, abs=1e-4) and out["ssim"][1] < 1
    wild = torch.full((1, 1, 16, 16), 5.0)
    assert ev(torch.ones(1, 1, 16, 16), wild)["psnr"][0] > 60  # clamped to [-1, 1] before scoring


def test_lpips_without_weights_is_unavailable_not_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ev = Evaluator(["psnr", "lpips"], torch.device("cpu"), (3, 32, 32))
    assert ev.status["lpips"]["available"] is False and "fetch_lpips_weights.py" in ev.status["lpips"]["reason"]
    out = ev(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    assert "lpips" not in out and "psnr" in out


def test_lpips_loads_without_third_party_warnings(tmp_path, monkeypatch):
    from torchvision.models import alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # random backbone weights in the file LPIPS reads
    alexnet_weights_path().parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in alexnet(weights=None).features.state_dict().items()},
               alexnet_weights_path())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, reason = load_lpips(torch.device("cpu"))
    assert reason is None and model is not None
    assert [str(w.message) for w in caught] == []


def test_lpips_too_small_images():
    ev = Evaluator(["lpips"], torch.device("cpu"), (1, 16, 16))
    assert "32 px" in ev.status["lpips"]["reason"]


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown eval_fn_list"):
        Evaluator(["fid"], torch.device("cpu"), (3, 32, 32))


def test_unpickler_admits_numpy_only():
    import numpy as np

    ok = pickle.dumps({"a": np.arange(3, dtype=np.float32)})
    assert fetch.NumpyOnlyUnpickler(io.BytesIO(ok)).load()["a"].tolist() == [0, 1, 2]
    evil = pickle.dumps(os.getcwd)  # any callable other than numpy's array reconstruction
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        fetch.NumpyOnlyUnpickler(io.BytesIO(evil)).load()


def test_lpips_matches_the_jax_reference():
    if not alexnet_weights_path().is_file():
        pytest.skip(f"no AlexNet weights at {alexnet_weights_path()}: run scripts/fetch_lpips_weights.py")
    assert fetch.verify()
