"""Image folders: ordering, id range, channels, resize/crop with a warning, clear errors."""
import logging

import pytest
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
