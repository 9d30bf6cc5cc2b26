"""Vessel-segmentation datasets on disk, loaded into validated, immutable samples.

Conventions (shared with the rest of the project): images are ``uint8`` H x W x 3, vessel masks are ``bool``
H x W (nonzero on disk = vessel), field-of-view (FOV) masks are ``bool`` H x W or ``None`` (whole image counts).

Every sample is read and checked when the dataset is loaded, not when it is first used: a bad file found in
the middle of a training run costs the run, one found at load time costs a second. For the same reason bad
input is never repaired silently. It is a :class:`DataError` naming the file and what is wrong, or, with
``skip_bad=True``, a sample that is dropped, recorded in :attr:`VesselDataset.skipped` and reported in a
warning.

Two layouts are understood:

* DRIVE's official layout (``training/`` and ``test/``, each with ``images/``, ``1st_manual/``, ``mask/``), so
  the dataset is used exactly as distributed. DRIVE has no validation split; :data:`DRIVE_VAL_IDS` carves one
  out of its training set so that model selection never looks at the test images.
* A generic layout, ``images/<stem>.<ext>`` + ``masks/<stem>.png`` (+ optional ``fov/<stem>.png``), split by
  ``train/ val/ test/`` subfolders, by ``train_``/``val_``/``test_`` file-name prefixes (ARCADE), or not at all.

Files are decoded with Pillow rather than imageio's defaults: DRIVE's TIFFs are LZW-compressed, which
imageio's tifffile plugin cannot decode without the optional ``imagecodecs`` package, and imageio applies a
GIF's palette, which turns DRIVE's second-observer masks (palette colours (4, 2, 4) and (252, 254, 252)) into
masks with no zero background.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image

__all__ = [  # noqa: RUF022 (grouped: types, constants, functions)
    "DataError",
    "Sample",
    "SkippedFile",
    "VesselDataset",
    "SPLITS",
    "DRIVE_TRAIN_IDS",
    "DRIVE_VAL_IDS",
    "DRIVE_TEST_IDS",
    "DRIVE_SPLIT_IDS",
    "DATA_DIR_ENV",
    "DATASET_NAMES",
    "resolve_root",
    "detect_layout",
    "list_splits",
    "load_dataset",
    "read_image",
    "read_mask",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Environment variable naming a folder that holds the full datasets (``DRIVE/``, ``ARCADE_syntax/``).
DATA_DIR_ENV = "RL_SEG_DATA_DIR"
#: Where the full datasets live next to the checkout when :data:`DATA_DIR_ENV` does not provide them.
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
#: The small excerpt committed with the repository (see data/samples/README.md), so tests and the
#: quickstart run without the full data.
SAMPLES_DIR = REPO_ROOT / "data" / "samples"

#: Named full datasets: name -> folder name under a data directory.
FULL_DATASETS = {"drive": "DRIVE", "arcade": "ARCADE_syntax"}
#: Named bundled excerpts: name -> folder name under :data:`SAMPLES_DIR`.
SAMPLE_DATASETS = {"drive-sample": "DRIVE", "arcade-sample": "ARCADE"}
DATASET_NAMES = (*FULL_DATASETS, *SAMPLE_DATASETS)

SPLITS = ("train", "val", "test")
#: The split of a folder that is not split at all.
ALL_SPLIT = "all"

#: DRIVE's official training set is 21-40 and its test set 01-20, with no validation set. 37-40 are held out of
#: training as a validation set (checkpoint and hyper-parameter selection), 21-36 are trained on; "train_all"
#: (21-40) is there for a final fit once those choices are made.
DRIVE_TRAIN_IDS = tuple(f"{i:02d}" for i in range(21, 37))
DRIVE_VAL_IDS = tuple(f"{i:02d}" for i in range(37, 41))
DRIVE_TEST_IDS = tuple(f"{i:02d}" for i in range(1, 21))
DRIVE_SPLIT_IDS: dict[str, tuple[str, ...]] = {
    "train": DRIVE_TRAIN_IDS,
    "val": DRIVE_VAL_IDS,
    "test": DRIVE_TEST_IDS,
    "train_all": DRIVE_TRAIN_IDS + DRIVE_VAL_IDS,
}
_DRIVE_FOLDER = {"train": "training", "val": "training", "train_all": "training", "test": "test"}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
MASK_SUFFIX = ".png"

# Pillow modes holding one 16-bit channel ("I" is how some Pillow versions return 16-bit PNGs).
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DataError(ValueError):
    """A dataset file (or folder) that cannot be used as it is; the message names its full path.

    A ``ValueError`` so that callers validating user input can catch both alike. ``path`` is the offending
    file, kept apart from the message so that skipped samples can be reported per file.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


@dataclass(frozen=True, eq=False, repr=False)
class Sample:
    """One image with its vessel mask and optional FOV mask, all of one height and width.

    The arrays are read-only: a dataset hands out the same arrays every epoch, so an in-place augmentation
    would otherwise corrupt every later epoch without a trace. Copy before modifying. Equality is identity
    (element-wise array comparison has no single truth value).
    """

    id: str
    image: np.ndarray
    mask: np.ndarray
    fov: np.ndarray | None
    image_path: Path
    mask_path: Path

    def __repr__(self) -> str:
        h, w = self.mask.shape
        fov = "None" if self.fov is None else "bool"
        return f"Sample(id={self.id!r}, {h}x{w}, fov={fov}, image_path='{self.image_path}')"


@dataclass(frozen=True)
class SkippedFile:
    """A sample dropped by ``load_dataset(..., skip_bad=True)``: the offending file and the error message."""

    path: Path
    reason: str


class VesselDataset(Sequence[Sample]):
    """The samples of one split, sorted by id; a read-only sequence, indexable by position or by id.

    ``skipped`` lists the samples dropped with ``skip_bad=True``, so that a run can report on exactly which
    data it did not see.
    """

    def __init__(
        self,
        name: str,
        split: str,
        root: Path,
        samples: Sequence[Sample],
        *,
        layout: str = "generic",
        skipped: Sequence[SkippedFile] = (),
    ) -> None:
        self.name = name
        self.split = split
        self.root = Path(root)
        self.layout = layout
        self.skipped: list[SkippedFile] = list(skipped)
        self._samples: tuple[Sample, ...] = tuple(samples)
        self._index = {s.id: i for i, s in enumerate(self._samples)}

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return list(self._samples[index])
        return self._samples[operator.index(index)]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def ids(self) -> list[str]:
        return [s.id for s in self._samples]

    def by_id(self, id: str) -> Sample:
        try:
            return self._samples[self._index[id]]
        except KeyError:
            raise KeyError(
                f"no sample with id {id!r} in {self.name} ({self.split}, {len(self)} samples, root {self.root})"
            ) from None

    def __repr__(self) -> str:
        skipped = f", skipped={len(self.skipped)}" if self.skipped else ""
        return (
            f"VesselDataset(name={self.name!r}, split={self.split!r}, n={len(self)}{skipped}, "
            f"layout={self.layout!r}, root='{self.root}')"
        )


# --------------------------------------------------------------------------------------------------- reading


def decode_image(path: str | os.PathLike[str], what: str, *, apply_palette: bool) -> tuple[Path, str, np.ndarray]:
    """Decode the first frame of an image file to ``(absolute path, Pillow mode, array)``, or raise DataError.

    ``apply_palette`` turns palette images into colours (what an image means) instead of indices (what a
    palette mask means).
    """
    p = Path(path).absolute()
    if not p.exists():
        raise DataError(f"{what} {p} does not exist", p)
    if not p.is_file():
        raise DataError(f"{what} {p} is not a file", p)
    if p.stat().st_size == 0:
        raise DataError(f"{what} {p} is empty (0 bytes)", p)
    try:
        with Image.open(p) as im:
            im.load()
            decoded: Image.Image = im
            if apply_palette and im.mode in ("P", "PA"):
                decoded = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
            elif im.mode not in ("1", "L", "P", "I", "F", "LA", "PA", "RGB", "RGBA", *_MODES_16BIT):
                decoded = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX...: only meaningful as RGB
            mode = decoded.mode
            array = np.asarray(decoded)
    except Exception as e:  # decoders raise a zoo of types (OSError, SyntaxError, zlib.error, struct.error...)
        raise DataError(f"{what} {p} cannot be read as an image: {e}", p) from e
    return p, mode, array


def _to_uint8_16bit(array: np.ndarray, p: Path, what: str) -> np.ndarray:
    if array.dtype != np.uint16 and (array.min() < 0 or array.max() > 65535):
        raise DataError(f"{what} {p} has {array.dtype} pixels outside the 16-bit range; unsupported", p)
    return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as ``uint8`` H x W x 3, whatever its mode, so that models see one input format.

    Grayscale is replicated to three channels, alpha is dropped, palettes are applied, 16-bit grayscale is
    scaled by 1/257 (65535 -> 255). 16-bit colour images are reduced by Pillow to their high byte (at most one
    level off 1/257). Float images are refused: they have no canonical 8-bit scale.
    """
    p, mode, a = decode_image(path, "image", apply_palette=True)
    if mode == "1":
        a = a.astype(np.uint8) * 255
    elif mode in _MODES_16BIT:
        a = _to_uint8_16bit(a, p, "image")
    elif mode == "F":
        raise DataError(f"image {p} has floating-point pixels; save it as 8- or 16-bit", p)
    if a.ndim == 3 and a.shape[2] in (2, 4):  # LA, RGBA: drop alpha
        a = a[..., :-1]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or a.size == 0:
        raise DataError(f"image {p} decodes to an unsupported {a.dtype} array of shape {a.shape}", p)
    return np.ascontiguousarray(a)


def read_mask(path: str | os.PathLike[str], *, what: str = "mask") -> np.ndarray:
    """Read a binary mask as ``bool`` H x W, nonzero = foreground, refusing anything that is not clearly binary.

    A ground truth with three or more values is usually a resampled, JPEG-compressed or label-map file; reading
    it as "nonzero" would quietly change the ground truth, so it is an error. So is a two-valued mask with no
    zero, which "nonzero" would make all foreground. Palette images are read by palette index, not colour (the
    convention of palette masks, and DRIVE's second-observer GIFs store background as index 0 with colour
    (4, 2, 4)). An RGB(A) mask is accepted when its colour channels are equal and its alpha, if any, constant.
    ``what`` names the file in messages ("mask", "FOV mask").
    """
    p, mode, a = decode_image(path, what, apply_palette=False)
    if a.ndim == 3:
        channels = a.shape[2]
        if channels in (2, 4):  # LA, PA, RGBA
            alpha = a[..., -1]
            if alpha.size and (alpha != alpha.flat[0]).any():
                raise DataError(f"{what} {p} has a varying alpha channel; save it without transparency", p)
            a = a[..., :-1]
        if a.shape[2] > 1 and (a != a[..., :1]).any():
            raise DataError(f"{what} {p} is a colour image (mode {mode}, its channels differ), not a 2-D mask", p)
        a = a[..., 0]
    if a.ndim != 2 or a.size == 0:
        raise DataError(f"{what} {p} is not a 2-D mask (decoded shape {a.shape})", p)
    if a.dtype == np.uint8:  # a histogram is several times faster than np.unique's sort
        values = np.flatnonzero(np.bincount(a.ravel(), minlength=256))
    else:
        values = np.unique(a)
    if len(values) > 2:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DataError(f"{what} {p} has {len(values)} distinct values ({shown}); a mask needs at most two", p)
    if len(values) == 2 and values[0] != 0 and values[1] != 0:
        raise DataError(
            f"{what} {p} has two values ({values[0]}, {values[1]}) and neither is 0; a mask needs 0 for background",
            p,
        )
    mask: np.ndarray = a != 0
    return mask


# -------------------------------------------------------------------------------------------------- locating


def _data_dirs() -> list[tuple[Path, str]]:
    """The folders searched for the full datasets, in order, each with where it comes from."""
    dirs = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        dirs.append((Path(env).expanduser().absolute(), f"${DATA_DIR_ENV}"))
    dirs.append((SHARED_DATA_DIR, "next to the checkout"))
    return dirs


def resolve_root(name_or_path: str | os.PathLike[str]) -> Path:
    """The folder of a dataset given by name (``drive``, ``arcade``, ``drive-sample``, ``arcade-sample``) or path.

    Only a ``str`` is matched against the names, so ``Path("drive")`` always means a folder called drive.
    """
    samples_hint = "the bundled excerpts 'drive-sample' and 'arcade-sample' need no download"
    if isinstance(name_or_path, str) and name_or_path in FULL_DATASETS:
        folder = FULL_DATASETS[name_or_path]
        dirs = _data_dirs()
        for d, _ in dirs:
            if (d / folder).is_dir():
                return d / folder
        looked = ", ".join(f"{d / folder} ({origin})" for d, origin in dirs)
        raise DataError(
            f"dataset {name_or_path!r} not found: looked for {looked}. Set {DATA_DIR_ENV} to the folder holding "
            f"{folder}/, or use a sample: {samples_hint}",
            dirs[0][0] / folder,
        )
    if isinstance(name_or_path, str) and name_or_path in SAMPLE_DATASETS:
        root = SAMPLES_DIR / SAMPLE_DATASETS[name_or_path]
        if not root.is_dir():
            raise DataError(
                f"bundled sample {name_or_path!r} not found: expected {root} (it ships with the repository "
                "checkout, under data/samples)",
                root,
            )
        return root
    root = Path(name_or_path).expanduser().absolute()
    if not root.exists():
        raise DataError(
            f"dataset folder {root} does not exist; names understood: {', '.join(DATASET_NAMES)} ({samples_hint})",
            root,
        )
    if not root.is_dir():
        raise DataError(f"dataset {root} is not a folder", root)
    return root


def detect_layout(root: Path) -> str:
    """``"drive"`` for DRIVE's official layout, else ``"generic"``.

    DRIVE is recognised by ``1st_manual/`` next to ``images/`` in ``training/`` or ``test/``, which tells it
    apart from a generic folder split into ``test/images``, ``test/masks``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset {root} is not a folder", root)
    for sub in ("training", "test"):
        if (root / sub / "images").is_dir() and (root / sub / "1st_manual").is_dir():
            return "drive"
    return "generic"


def _list_images(images_dir: Path) -> dict[str, list[Path]]:
    """Image files by stem; hidden files (``.DS_Store``, ``._x.png``) are not images."""
    found: dict[str, list[Path]] = {}
    if images_dir.is_dir():
        for p in images_dir.iterdir():
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                found.setdefault(p.stem, []).append(p)
    return found


def _split_prefix(stem: str) -> str | None:
    for split in SPLITS:
        if stem.startswith(split + "_"):
            return split
    return None


def _generic_mode(root: Path) -> tuple[str, list[str]]:
    """How a generic folder is split: ``("folders" | "prefix" | "single", splits)``."""
    folders = [s for s in SPLITS if (root / s / "images").is_dir()]
    if folders:
        return "folders", folders
    stems = _list_images(root / "images")
    prefixes = {_split_prefix(stem) for stem in stems}
    if stems and None not in prefixes:
        return "prefix", [s for s in SPLITS if s in prefixes]
    return "single", [ALL_SPLIT]


def _drive_present(root: Path, split: str) -> list[str]:
    folder = _DRIVE_FOLDER[split]
    images = root / folder / "images"
    return [i for i in DRIVE_SPLIT_IDS[split] if (images / f"{i}_{folder}.tif").is_file()]


def list_splits(name_or_path: str | os.PathLike[str]) -> list[str]:
    """The splits with images on disk, in train/val/test order; ``["all"]`` for an unsplit folder.

    DRIVE also accepts ``"train_all"`` (train + val), which is not listed because it overlaps the others.
    """
    root = resolve_root(name_or_path)
    if detect_layout(root) == "drive":
        return [s for s in SPLITS if _drive_present(root, s)]
    return _generic_mode(root)[1]


# --------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Candidate:
    """A sample found on disk, not yet read; ``problem`` is what is already known to be wrong with it."""

    id: str
    image_path: Path
    mask_path: Path
    fov_path: Path | None
    fov_required: bool = False
    problem: DataError | None = None


def _drive_candidates(root: Path, split: str) -> list[_Candidate]:
    folder = _DRIVE_FOLDER[split]
    sub = root / folder
    out = []
    for i in _drive_present(root, split):
        image = sub / "images" / f"{i}_{folder}.tif"
        mask = sub / "1st_manual" / f"{i}_manual1.gif"
        fov = sub / "mask" / f"{i}_{folder}_mask.gif"
        problem = None
        if not mask.is_file():
            problem = DataError(f"no mask for image {image}: expected {mask}", image)
        elif not fov.is_file():
            # DRIVE's metrics are defined inside the FOV: scoring the whole image instead would silently
            # change every number, so a missing FOV is an error here (unlike the generic layout).
            problem = DataError(f"no FOV mask for image {image}: expected {fov}", image)
        out.append(_Candidate(i, image, mask, fov, fov_required=True, problem=problem))
    return out


def _generic_candidates(folder: Path, prefix: str | None) -> list[_Candidate]:
    images_dir, masks_dir, fov_dir = folder / "images", folder / "masks", folder / "fov"
    if not images_dir.is_dir():
        raise DataError(
            f"no images folder in {folder}: expected {images_dir}/ (with {masks_dir}/), "
            "or DRIVE's training/ and test/ folders",
            images_dir,
        )
    images = _list_images(images_dir)
    if not images:
        raise DataError(f"no images in {images_dir} (looked for {', '.join(IMAGE_SUFFIXES)})", images_dir)
    masks = _list_images(masks_dir)
    fovs = _list_images(fov_dir)
    out = []
    for stem in sorted(images):
        if prefix is not None and not stem.startswith(prefix + "_"):
            continue
        paths = sorted(images[stem])
        image = paths[0]
        expected = masks_dir / f"{stem}{MASK_SUFFIX}"
        mask = next((m for m in masks.get(stem, []) if m.suffix.lower() == MASK_SUFFIX), expected)
        fov = next((f for f in fovs.get(stem, []) if f.suffix.lower() == MASK_SUFFIX), None)
        problem = None
        if len(paths) > 1:
            problem = DataError(
                f"image {image} is ambiguous: several images share its id {stem!r} "
                f"({', '.join(p.name for p in paths)})",
                image,
            )
        elif not mask.is_file():
            others = [m.name for m in masks.get(stem, [])]
            hint = f" (found {', '.join(others)}; masks must be {MASK_SUFFIX})" if others else ""
            problem = DataError(f"no mask for image {image}: expected {expected}{hint}", image)
        out.append(_Candidate(stem, image, mask, fov, problem=problem))
    return out


def _load_sample(c: _Candidate) -> Sample:
    if c.problem is not None:
        raise c.problem
    image = read_image(c.image_path)
    h, w = image.shape[:2]
    mask = read_mask(c.mask_path)
    if mask.shape != (h, w):
        raise DataError(
            f"mask {c.mask_path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image {c.image_path} is {h}x{w}",
            c.mask_path,
        )
    fov = None
    if c.fov_path is not None and (c.fov_required or c.fov_path.is_file()):
        fov = read_mask(c.fov_path, what="FOV mask")
        if fov.shape != (h, w):
            raise DataError(
                f"FOV mask {c.fov_path} is {fov.shape[0]}x{fov.shape[1]} (HxW) but its image {c.image_path} is {h}x{w}",
                c.fov_path,
            )
    for a in (image, mask, fov):
        if a is not None:
            a.setflags(write=False)
    return Sample(c.id, image, mask, fov, c.image_path, c.mask_path)


def _summary(skipped: Sequence[SkippedFile], shown: int = 3) -> str:
    text = "; ".join(s.reason for s in skipped[:shown])
    if len(skipped) > shown:
        text += f"; and {len(skipped) - shown} more (see dataset.skipped)"
    return text


def load_dataset(
    name_or_path: str | os.PathLike[str],
    split: str = "test",
    *,
    skip_bad: bool = False,
    limit: int | None = None,
) -> VesselDataset:
    """Load and validate one split of a dataset (a name from :data:`DATASET_NAMES` or a folder).

    Without ``skip_bad`` the first bad sample (in id order) raises its :class:`DataError`; with it, bad samples
    are dropped and listed in ``dataset.skipped``. ``limit`` keeps the first ``limit`` good samples in id order
    and reads no further, so a quick run does not pay for (or fail on) files it will not use. A folder with no
    splits is one split, ``"all"``, returned for any ``split`` asked.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples or None, got {limit}")
    root = resolve_root(name_or_path)
    name = name_or_path if isinstance(name_or_path, str) and name_or_path in DATASET_NAMES else root.name
    layout = detect_layout(root)

    if layout == "drive":
        available = [s for s in SPLITS if _drive_present(root, s)]
        accepted = available + (["train_all"] if _drive_present(root, "train_all") else [])
        if split not in accepted:
            raise DataError(
                f"no split {split!r} in DRIVE folder {root}; available: {', '.join(available) or 'none'}"
                + (" (and train_all = train + val)" if "train_all" in accepted else ""),
                root,
            )
        candidates = _drive_candidates(root, split)
    else:
        mode, available = _generic_mode(root)
        if mode == "single":
            if split != ALL_SPLIT:
                log.info("%s has no train/val/test splits: using all of it as split 'all' (asked for %r)", root, split)
            split = ALL_SPLIT
            candidates = _generic_candidates(root, None)
        elif split not in available:
            raise DataError(f"no split {split!r} in {root}; available splits: {', '.join(available)}", root)
        elif mode == "folders":
            candidates = _generic_candidates(root / split, None)
        else:
            candidates = _generic_candidates(root, split)

    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    examined = 0
    for c in candidates:
        if limit is not None and len(samples) >= limit:
            break
        examined += 1
        try:
            samples.append(_load_sample(c))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(SkippedFile(e.path or c.image_path, str(e)))

    where = f"{root} (split {split!r})"
    if skipped:
        log.warning(
            "skipped %d bad sample%s of %d in %s: %s",
            len(skipped),
            "" if len(skipped) == 1 else "s",
            examined,
            where,
            _summary(skipped),
        )
    if not samples:
        raise DataError(f"no usable samples in {where}: all {examined} are bad: {_summary(skipped)}", root)
    return VesselDataset(name, split, root, samples, layout=layout, skipped=skipped)
