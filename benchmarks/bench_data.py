"""Small image data sets the benchmarks build offline, written as ``NAME/{train,val,test}/<class>/*.png``.

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (the demo's data; 10 classes).
- ``glyphs``: 10 capital letters rendered from the TrueType fonts installed on the machine (DejaVu and
  Liberation families here), each with a random font, size, rotation, shear, shift, grey levels, blur and
  noise (1,500 images at 48 px; like notMNIST, but from system fonts).
- ``patches``: photo patches cut from scikit-learn's two bundled photos (``china.jpg``, ``flower.jpg``);
  the class is which of 12 regions (a 2 x 3 grid per photo) the patch comes from; random patch size,
  position inside the region, flips and 90-degree turns (1,440 images at 48 px). A texture task on real
  photographic content; neighbouring regions share sky, leaves or petals, so it is not trivially separable.
- ``digits-few``: ``digits`` with its train split cut to 12 images per class (val and test kept whole): a
  few-shot set, built to judge the ``few-images`` prior (removed: docs/controller.md).
- ``dots``: how many dots (1 to 8) an image holds, at random positions, sizes and grey levels on a noisy
  background (960 images at 48 px). Counting is what pooled ImageNet features do poorly (they say what is
  there, not how many), so the linear probe fits badly (fit 0.39); built to judge the ``features-fit-poorly``
  prior (removed: docs/controller.md).
- ``glyphs-few``, ``patches-few``, ``dots-few``: the same sets with their train split cut to 20, 15 and 40
  images per class (val and test cut to 20 and 30 per class): few-shot variants with headroom, for the portfolio grid
  (``benchmarks/portfolio_grid.py``), where the untuned recipe stays below 95 % test accuracy.

Each builder is deterministic for a given seed and writes a ``.complete`` marker last, so a half-written
set is rebuilt. Splits: 60% train / 20% val / 20% test, stratified.

    python benchmarks/bench_data.py [--cache demo_data/bench] [NAME ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_data import write_digits

__all__ = ["BUILDERS", "build", "find_fonts"]

SIZE = 48
LETTERS = "ABCDEFGHJK"
MARKER = ".complete"


def find_fonts() -> list[Path]:
    """TrueType fonts installed on this machine (fontconfig's list, else the usual folders)."""
    try:
        listed = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, timeout=30).stdout
        fonts = {Path(line.split(":")[0].strip()) for line in listed.splitlines() if line.strip()}
    except (OSError, subprocess.SubprocessError):
        fonts = set()
    for folder in (Path("/usr/share/fonts"), Path("/Library/Fonts"), Path("C:/Windows/Fonts")):
        if folder.is_dir():
            fonts |= set(folder.rglob("*.ttf"))
    return sorted(f for f in fonts if f.suffix.lower() == ".ttf" and f.is_file())


def _split_and_write(root: Path, images: list[np.ndarray], labels: list[str], *, seed: int) -> None:
    """Stratified 60/20/20 split, written as PNGs under ``root/{train,val,test}/<class>/``."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(images))
    rest, test = train_test_split(index, test_size=0.2, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=[labels[i] for i in rest], random_state=seed)
    for split, rows in (("train", train), ("val", val), ("test", test)):
        for i in rows:
            folder = root / split / labels[i]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")


def _glyph(font_path: Path, letter: str, rng: np.random.Generator) -> np.ndarray:
    """One letter at 48 px: random font size, affine jitter, grey levels, blur and Gaussian noise."""
    canvas = 96  # draw large, transform, then shrink: smoother edges than drawing at 48 px
    ink, paper = (int(v) for v in rng.permutation([rng.integers(0, 90), rng.integers(160, 256)]))
    image = Image.new("L", (canvas, canvas), paper)
    font = ImageFont.truetype(str(font_path), int(rng.integers(44, 72)))
    ImageDraw.Draw(image).text((canvas / 2, canvas / 2), letter, fill=ink, font=font, anchor="mm")
    angle, shear = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(-0.25, 0.25)
    scale = rng.uniform(0.85, 1.15)
    dx, dy = rng.uniform(-8, 8, size=2)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    c = canvas / 2  # inverse affine about the centre, as PIL's transform expects
    matrix = (cos, sin + shear, c - c * cos - c * (sin + shear) - dx, -sin, cos, c + c * sin - c * cos - dy)
    image = image.transform(image.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=paper)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.5))).resize((SIZE, SIZE), Image.Resampling.BOX)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 18), size=(SIZE, SIZE))
    return noisy.clip(0, 255).astype(np.uint8)


def build_glyphs(root: Path, *, seed: int = 0, per_class: int = 150) -> None:
    """Letters from the installed fonts (see the module docstring)."""
    fonts = find_fonts()
    if not fonts:
        raise SystemExit("glyphs: no TrueType fonts found (fc-list, /usr/share/fonts); install fonts-dejavu-core.")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for letter in LETTERS:
        for _ in range(per_class):
            images.append(_glyph(fonts[rng.integers(len(fonts))], letter, rng))
            labels.append(letter)
    _split_and_write(root, images, labels, seed=seed)


def build_patches(root: Path, *, seed: int = 0, per_class: int = 120) -> None:
    """Patches of scikit-learn's two sample photos, labelled by region (see the module docstring)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for photo, name in zip(photos.images, ("china", "flower"), strict=True):
        height, width = photo.shape[0] // 2, photo.shape[1] // 3
        for row in range(2):
            for col in range(3):
                region = photo[row * height : (row + 1) * height, col * width : (col + 1) * width]
                for _ in range(per_class):
                    side = int(rng.integers(40, min(height, width, 96)))
                    y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
                    patch = np.rot90(region[y : y + side, x : x + side], k=int(rng.integers(4)))
                    if rng.random() < 0.5:
                        patch = patch[:, ::-1]
                    small = Image.fromarray(np.ascontiguousarray(patch)).resize((SIZE, SIZE), Image.Resampling.BOX)
                    images.append(np.asarray(small))
                    labels.append(f"{name}_r{row}c{col}")
    _split_and_write(root, images, labels, seed=seed)


def _build_digits(root: Path, *, seed: int = 0) -> None:
    write_digits(root, seed=seed)


def _keep_few(train: Path, per_class: int, *, seed: int) -> None:
    """Cut every class folder under ``train`` to ``per_class`` images chosen at random."""
    rng = np.random.default_rng(seed)
    for folder in sorted(train.iterdir()):
        files = sorted(folder.iterdir())
        for extra in rng.permutation(len(files))[per_class:]:
            files[extra].unlink()


def build_digits_few(root: Path, *, seed: int = 0, per_class: int = 12) -> None:
    """``digits`` with ``per_class`` train images per class, chosen at random (val and test whole)."""
    write_digits(root, seed=seed)
    _keep_few(root / "train", per_class, seed=seed)


def few_shot(builder: Callable[..., None], per_class: int, *, val: int = 20, test: int = 30) -> Callable[..., None]:
    """A builder of ``builder``'s set with its train split cut to ``per_class`` images per class.

    Val and test are cut to at most ``val`` and ``test`` per class: evaluating every epoch would otherwise
    cost more than training on so few images.
    """

    def build_few(root: Path, *, seed: int = 0) -> None:
        builder(root, seed=seed)
        for split, keep in (("train", per_class), ("val", val), ("test", test)):
            _keep_few(root / split, keep, seed=seed)

    return build_few


def _dots(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` non-overlapping discs of random radius and ink on a noisy, randomly grey background."""
    paper = int(rng.integers(0, 256))
    ink = (paper + int(rng.integers(80, 176))) % 256  # always at least 80 grey levels from the paper
    image = Image.new("L", (SIZE, SIZE), paper)
    draw, placed = ImageDraw.Draw(image), []
    while len(placed) < count:
        r = float(rng.uniform(2.0, 4.0))
        x, y = rng.uniform(r + 1, SIZE - r - 1, size=2)
        if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + 2) ** 2 for px, py, pr in placed):
            placed.append((x, y, r))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, size=(SIZE, SIZE))
    return noisy.clip(0, 255).astype(np.uint8)


def build_dots(root: Path, *, seed: int = 0, per_class: int = 120) -> None:
    """Images of 1-8 dots, labelled by the count (see the module docstring)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for count in range(1, 9):
        for _ in range(per_class):
            images.append(_dots(count, rng))
            labels.append(f"{count}_dots")
    _split_and_write(root, images, labels, seed=seed)


BUILDERS: dict[str, Callable[..., None]] = {
    "digits": _build_digits,
    "glyphs": build_glyphs,
    "patches": build_patches,
    "digits-few": build_digits_few,
    "dots": build_dots,
    "glyphs-few": few_shot(build_glyphs, 20),
    "patches-few": few_shot(build_patches, 15),
    "dots-few": few_shot(build_dots, 40),
}


def build(name: str, cache: Path) -> Path:
    """The data set ``name`` under ``cache``, built on first use; returns its folder.

    >>> build("glyphs", Path("demo_data/bench"))  # doctest: +SKIP
    PosixPath('demo_data/bench/glyphs')
    """
    if name not in BUILDERS:
        raise SystemExit(f"unknown data set {name!r}; choose from: {', '.join(BUILDERS)}")
    root = cache / name
    if (root / MARKER).is_file():
        return root
    if root.exists():
        shutil.rmtree(root)  # half-written by an interrupted build
    BUILDERS[name](root)
    (root / MARKER).write_text("ok\n")
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(BUILDERS))
    parser.add_argument("--cache", type=Path, default=Path("demo_data/bench"))
    args = parser.parse_args()
    for data_set in args.names:
        print(build(data_set, args.cache))
