"""Write scikit-learn's bundled digits (1,797 real 8x8 handwritten digits) as an image folder.

The one real image data set that installs offline: ``data/train|val|test/<digit>/*.png``, split
stratified with a fixed seed (60% / 20% / 20%).

    python examples/digits_data.py demo_data/digits
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def write_digits(root: Path, *, seed: int = 0) -> Path:
    """Write the digits as PNGs under ``root`` (skipped if already there); returns ``root``."""
    if (root / "test").is_dir():
        return root
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # pixel values 0..16 -> 0..255
    index = np.arange(len(images))
    rest, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=digits.target[rest], random_state=seed)
    for split, rows in (("train", train), ("val", val), ("test", test)):
        for i in rows:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return root


if __name__ == "__main__":
    print(write_digits(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_data/digits")))
