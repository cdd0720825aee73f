"""Image folders: ordering, id range, channels, resize/crop with a warning, clear errors; result grids."""
import logging

import pytest
import torch
from PIL import Image

from tests.conftest import save_images
from utils.data import build_dataset


def test_folder_range_channels_and_resize(tmp_path, caplog):
    save_images(tmp_path / "a", 4, 16, channels=3)
    Image.new("RGB", (40, 24), (255, 0, 0)).save(tmp_path / "a" / "zzz.jpg")
    with caplog.at_level(logging.WARNING):
        ds = build_dataset({"name": "image", "root": str(tmp_path / "a"), "resolution": 16, "start_id": 2, "end_id": 5})
    assert [it.index for it in ds.items] == [2, 3, 4] and ds[2].name == "zzz"
    assert ds[2].image.shape == (3, 16, 16) and "resized to 16" in caplog.text
    assert float(ds[2].image[0].mean()) == pytest.approx(1.0, abs=0.02) and float(ds[2].image[1].mean()) < -0.97  # JPEG
    gray = build_dataset({"name": "image", "root": str(tmp_path / "a"), "resolution": 16, "channels": 1, "end_id": 1})
    assert gray[0].image.shape == (1, 16, 16)


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        build_dataset({"name": "image", "root": str(tmp_path / "missing"), "resolution": 16})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no png/jpg"):
        build_dataset({"name": "image", "root": str(tmp_path / "empty"), "resolution": 16})
    save_images(tmp_path / "b", 2, 16)
    with pytest.raises(ValueError, match="empty range"):
        build_dataset({"name": "image", "root": str(tmp_path / "b"), "resolution": 16, "start_id": 5})


def test_grid_of_tensors_or_uint8_cells_saves_each_pixel_as_its_image(tmp_path):
    """save_grid: a cell given as a tensor in [-1, 1] or as its to_uint8 array lands unchanged at its place (NaN
    black); None cells and the padding are white; grayscale stays one channel, or shows gray in an RGB grid; a grid
    of None cells or a non-uint8 array is refused with what to do."""
    import numpy as np
    from PIL import Image

    from utils.images import save_grid, to_uint8

    g = torch.Generator().manual_seed(0)
    for c in (3, 1):
        a, b = torch.rand(c, 5, 7, generator=g) * 2 - 1, torch.rand(c, 5, 7, generator=g) * 2 - 1
        b[:, 1, 2] = float("nan")
        save_grid([[a, None], [to_uint8(b)]], tmp_path / "g.png", pad=2)
        grid = np.array(Image.open(tmp_path / "g.png"))
        assert grid.shape[:2] == (2 + 2 * 7, 2 + 2 * 9) and grid.ndim == (3 if c == 3 else 2)
        assert (grid[2:7, 2:9] == to_uint8(a)).all() and (grid[9:14, 2:9] == to_uint8(b)).all()
        assert (grid[9:14, 2:9][1, 2] == 0).all()
        white = np.ones(grid.shape[:2], bool)
        white[2:7, 2:9] = white[9:14, 2:9] = False
        assert (grid[white] == 255).all()
    rgb, gray = torch.rand(3, 5, 7, generator=g) * 2 - 1, torch.rand(1, 5, 7, generator=g) * 2 - 1
    save_grid([[rgb, gray]], tmp_path / "g.png", pad=2)  # a grayscale cell in an RGB grid
    grid = np.array(Image.open(tmp_path / "g.png"))
    assert grid.ndim == 3 and (grid[2:7, 11:18] == to_uint8(gray)[..., None]).all()
    with pytest.raises(ValueError, match="every cell is None"):
        save_grid([[None]], tmp_path / "n.png")
    with pytest.raises(TypeError, match="must be uint8"):
        save_grid([[np.zeros((5, 7), np.float32)]], tmp_path / "f.png")
