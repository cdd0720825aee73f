"""The gmm model config (configs/model/gmm_toy.yaml): generated blobs, or the user's own weights, means and stds."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cores.gmm import mixture_from_config
from cores.models import GaussianMixtureDenoiser, build_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = [1, 2, 2]
MEANS = [[0.1, 0.2, 0.3, 0.4], [-0.5, 0.0, 0.5, 1.0]]


def toy_config(**keys) -> dict:
    cfg = yaml.safe_load((ROOT / "configs/model/gmm_toy.yaml").read_text())
    return {**cfg, "shape": SHAPE, **keys}


def test_default_config_is_three_blobs_and_their_twins():
    model = build_model(yaml.safe_load((ROOT / "configs/model/gmm_toy.yaml").read_text()))
    assert model.image_shape == (1, 16, 16) and len(model.weights) == 6
    torch.testing.assert_close(model.weights, torch.full((6,), 1 / 6))
    torch.testing.assert_close(model.stds, torch.full((6,), 0.05))
    m = model.means.view(6, 1, 16, 16)
    torch.testing.assert_close(m[3:], m[:3].flip(-2, -1))


def test_explicit_list_means():
    model = build_model(toy_config(means=MEANS, weights=[0.3, 0.7], stds=[0.05, 0.1]))
    assert isinstance(model, GaussianMixtureDenoiser) and model.image_shape == tuple(SHAPE)
    torch.testing.assert_close(model.means, torch.tensor(MEANS))
    torch.testing.assert_close(model.weights, torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(model.stds, torch.tensor([0.05, 0.1]))


def test_explicit_means_default_to_equal_weights_and_a_scalar_std_is_shared():
    mix = mixture_from_config(SHAPE, means=MEANS, stds=0.2)
    assert mix.weights.tolist() == [0.5, 0.5] and mix.stds.tolist() == [0.2, 0.2]


@pytest.mark.parametrize("layout", ["flat", "image"])
def test_npy_means(tmp_path, layout):
    means = np.random.default_rng(0).normal(size=(3, 1, 2, 2))
    path = tmp_path / "m.npy"
    np.save(path, means.reshape(3, 4) if layout == "flat" else means)
    model = build_model(toy_config(means=str(path), weights=[0.2, 0.3, 0.5], stds=0.05))
    torch.testing.assert_close(model.means, torch.tensor(means.reshape(3, 4), dtype=torch.float32))
    x = model.sample(5, torch.Generator().manual_seed(0))[0]
    assert x.shape == (5, 1, 2, 2) and torch.isfinite(model.denoise(x, 0.5)).all()


@pytest.mark.parametrize("keys, message", [
    ({"means": [[0.0] * 5, [1.0] * 5]}, "'means' has shape (2, 5)"),
    ({"means": [0.0, 0.1, 0.2, 0.3]}, "'means' has shape (4,)"),
    ({"means": [[0.0, 0.1], [0.2]]}, "'means' must be numbers"),
    ({"means": MEANS, "weights": [0.3, 0.6]}, "'weights' must sum to 1"),
    ({"means": MEANS, "weights": [1.2, -0.2]}, "'weights' must be positive"),
    ({"means": MEANS, "weights": [1.0]}, "'weights' has shape (1,)"),
    ({"means": MEANS, "stds": [0.1, 0.0]}, "'stds' must be positive"),
    ({"means": MEANS, "stds": -1.0}, "'stds' must be positive"),
    ({"means": MEANS, "stds": [0.1, 0.1, 0.1]}, "'stds' has shape (3,)"),
    ({"means": MEANS, "stds": None}, "'stds' is required"),
    ({"means": [[float("nan")] * 4]}, "'means' has non-finite values"),
    ({"means": MEANS, "num_components": 2, "seed": 1}, "blob keys num_components, seed"),
    ({"means": MEANS, "twins": False}, "blob keys twins"),
    ({"weights": [0.5, 0.5]}, "'weights' belong to an explicit mixture: give 'means' too"),
    ({"stds": 0.1}, "'stds' belong to an explicit mixture: give 'means' too"),
    ({"component_std": 0.0}, "'component_std' must be positive"),
    ({"num_components": 0}, "'num_components' must be at least 1"),
    ({"shape": [4]}, "'shape' must be [C, H, W]"),
])
def test_bad_configs_are_refused_naming_the_key(keys, message):
    cfg = toy_config(**({"stds": 0.1} if "means" in keys else {}))
    cfg.update(keys)
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    assert message in str(err.value)


def test_missing_or_non_numeric_npy_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="gmm 'means': no such file"):
        build_model(toy_config(means=str(tmp_path / "none.npy"), stds=0.1))
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="gmm 'means'"):
        build_model(toy_config(means=str(path), stds=0.1))
