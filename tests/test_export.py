"""Predict mode's host side: finding and reading input images, naming outputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mpformer_jax.evaluation.export import unique_names
from mpformer_jax.training.prediction import list_images, load_image


def test_list_images_takes_image_files_of_a_directory_or_a_glob(tmp_path):
  for name in ("b.png", "a.JPG", "c.txt"):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name, format="PNG")
  (tmp_path / "sub.png").mkdir()  # a directory with an image-like name is not a file
  assert [p.split("/")[-1] for p in list_images(str(tmp_path))] == ["a.JPG", "b.png"]
  assert [p.split("/")[-1] for p in list_images(str(tmp_path / "*.txt"))] == ["c.txt"]
  with pytest.raises(FileNotFoundError, match="no image files"):
    list_images(str(tmp_path / "missing" / "*.png"))


def test_load_image_converts_to_rgb_and_names_an_unreadable_file(tmp_path):
  Image.fromarray(np.full((3, 5), 7, np.uint8)).save(tmp_path / "grey.png")
  Image.fromarray(np.zeros((3, 5, 4), np.uint8)).save(tmp_path / "rgba.png")
  for name in ("grey.png", "rgba.png"):
    image = load_image(str(tmp_path / name))
    assert image.shape == (3, 5, 3) and image.dtype == np.uint8
  assert load_image(str(tmp_path / "grey.png"))[0, 0].tolist() == [7, 7, 7]
  (tmp_path / "broken.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png"):
    load_image(str(tmp_path / "broken.png"))


def test_unique_names_disambiguates_repeated_stems():
  assert unique_names(["x/a.png", "y/a.jpg", "b.png"]) == ["a_0", "a_1", "b"]
  assert unique_names(["a.png", "b.png"]) == ["a", "b"]
