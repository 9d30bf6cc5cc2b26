"""Tests of rl_seg.data on the bundled samples (data/samples) and on small folders built in tmp_path."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rl_seg import data
from rl_seg.data import DataError, load_dataset, read_image, read_mask

REPO_ROOT = Path(data.__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SAMPLE_DRIVE = REPO_ROOT / "data" / "samples" / "DRIVE"


# ---------------------------------------------------------------------------------------------------- helpers


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_image(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_mask(h: int = 24, w: int = 32) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[h // 2, :] = 255
    m[:, w // 3] = 255
    return m


def add_sample(folder: Path, stem: str, *, h: int = 24, w: int = 32, fov: bool = False) -> tuple[Path, Path]:
    """A good generic-layout sample; returns (image path, mask path)."""
    image = save(folder / "images" / f"{stem}.png", make_image(h, w, seed=len(stem)))
    mask = save(folder / "masks" / f"{stem}.png", make_mask(h, w))
    if fov:
        save(folder / "fov" / f"{stem}.png", np.full((h, w), 255, np.uint8))
    return image, mask


@pytest.fixture(scope="module")
def drive_test() -> data.VesselDataset:
    return load_dataset("drive-sample", "test")


@pytest.fixture(scope="module")
def arcade() -> dict[str, data.VesselDataset]:
    return {split: load_dataset("arcade-sample", split) for split in data.SPLITS}


# ------------------------------------------------------------------------------------------- bundled samples


@pytest.mark.parametrize(
    "split, ids",
    [
        ("train", ["21", "22", "23", "24"]),
        ("val", ["37", "38"]),
        ("test", ["01", "02"]),
        ("train_all", ["21", "22", "23", "24", "37", "38"]),
    ],
)
def test_drive_sample_split_membership(split: str, ids: list[str]) -> None:
    ds = load_dataset("drive-sample", split)
    assert ds.ids() == ids
    assert set(ids) <= set(data.DRIVE_SPLIT_IDS[split])
    assert (ds.name, ds.split, ds.layout, ds.root) == ("drive-sample", split, "drive", SAMPLE_DRIVE)
    assert ds.skipped == []


def test_drive_split_constants_partition_official_sets() -> None:
    train, val, test = (set(data.DRIVE_SPLIT_IDS[s]) for s in data.SPLITS)
    assert train | val == {f"{i}" for i in range(21, 41)} and not train & val
    assert test == {f"{i:02d}" for i in range(1, 21)}
    assert data.DRIVE_SPLIT_IDS["train_all"] == data.DRIVE_TRAIN_IDS + data.DRIVE_VAL_IDS


def test_drive_sample_arrays(drive_test: data.VesselDataset) -> None:
    for s in drive_test:
        assert s.image.shape == (584, 565, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (584, 565) and s.mask.dtype == bool
        assert s.fov is not None and s.fov.shape == (584, 565) and s.fov.dtype == bool
        inside = s.mask & s.fov
        assert inside.any()
        assert inside.sum() > 0.99 * s.mask.sum()  # the ground truth lies in the field of view
        assert 0.03 < s.mask.mean() < 0.15 and 0.5 < s.fov.mean() < 0.9
        assert s.image_path == SAMPLE_DRIVE / "test" / "images" / f"{s.id}_test.tif"
        assert s.mask_path == SAMPLE_DRIVE / "test" / "1st_manual" / f"{s.id}_manual1.gif"


def test_drive_sample_tifs_are_readable_rgb(drive_test: data.VesselDataset) -> None:
    image = drive_test.by_id("01").image
    assert not np.array_equal(image[..., 0], image[..., 1])  # colour, not replicated gray
    assert image[292, 282].sum() > 0  # the centre of the fundus is not black


def test_sample_is_frozen_and_read_only(drive_test: data.VesselDataset) -> None:
    s = drive_test[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.id = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        s.mask[0, 0] = True
    assert "01" in repr(s) and "584x565" in repr(s)


def test_dataset_is_a_sequence(drive_test: data.VesselDataset) -> None:
    assert len(drive_test) == 2
    assert drive_test[-1].id == "02" and [s.id for s in drive_test[0:1]] == ["01"]
    assert [s.id for s in drive_test] == drive_test.ids()
    assert drive_test.by_id("02") is drive_test[1]
    with pytest.raises(KeyError, match="'99'"):
        drive_test.by_id("99")
    with pytest.raises(IndexError):
        drive_test[5]


def test_arcade_sample_splits_by_prefix(arcade: dict[str, data.VesselDataset]) -> None:
    assert {split: len(ds) for split, ds in arcade.items()} == {"train": 8, "val": 4, "test": 4}
    assert arcade["train"].ids() == [f"train_{i:04d}" for i in range(1, 9)]
    assert arcade["val"].ids()[0] == "val_0001" and arcade["test"].ids()[-1] == "test_0004"
    for ds in arcade.values():
        assert ds.layout == "generic"
        for s in ds:
            assert s.fov is None
            assert s.image.shape == (512, 512, 3) and s.image.dtype == np.uint8
            assert s.mask.shape == (512, 512) and s.mask.dtype == bool and s.mask.any()
            assert np.array_equal(s.image[..., 0], s.image[..., 2])  # grayscale replicated


def test_list_splits_of_samples() -> None:
    assert data.list_splits("drive-sample") == ["train", "val", "test"]
    assert data.list_splits("arcade-sample") == ["train", "val", "test"]
    assert data.detect_layout(SAMPLE_DRIVE) == "drive"


def test_limit_keeps_first_ids() -> None:
    ds = load_dataset("arcade-sample", "train", limit=3)
    assert ds.ids() == ["train_0001", "train_0002", "train_0003"]
    with pytest.raises(ValueError):
        load_dataset("arcade-sample", "train", limit=0)


# ---------------------------------------------------------------------------------------------- generic layout


def test_generic_single_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    add_sample(tmp_path, "b", fov=True)
    add_sample(tmp_path, "a")
    save(tmp_path / "images" / "c.jpg", make_image())
    save(tmp_path / "masks" / "c.png", make_mask())
    save(tmp_path / "masks" / "orphan.png", make_mask())  # a mask without image is ignored
    (tmp_path / "images" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    assert data.detect_layout(tmp_path) == "generic"
    assert data.list_splits(tmp_path) == ["all"]
    with caplog.at_level(logging.INFO, logger="rl_seg.data"):
        ds = load_dataset(tmp_path, "test")
    assert "no train/val/test splits" in caplog.text
    assert ds.split == "all" and ds.name == tmp_path.name and ds.ids() == ["a", "b", "c"]
    assert ds.by_id("a").fov is None
    fov = ds.by_id("b").fov
    assert fov is not None and fov.all()
    assert ds.by_id("c").image.shape == (24, 32, 3)
    assert np.array_equal(ds.by_id("a").mask, make_mask() > 0)
    assert load_dataset(str(tmp_path), "train").ids() == ["a", "b", "c"]


def test_generic_split_subfolders(tmp_path: Path) -> None:
    for split, stems in {"train": ["x1", "x2", "x3"], "val": ["v1"], "test": ["t1", "t2"]}.items():
        for stem in stems:
            add_sample(tmp_path / split, stem)
    assert data.list_splits(tmp_path) == ["train", "val", "test"]
    assert load_dataset(tmp_path, "train").ids() == ["x1", "x2", "x3"]
    assert load_dataset(tmp_path, "val").ids() == ["v1"]
    assert load_dataset(tmp_path, "test").ids() == ["t1", "t2"]


@pytest.mark.parametrize("kind", ["folders", "prefix"])
def test_unknown_split_lists_available(tmp_path: Path, kind: str) -> None:
    if kind == "folders":
        add_sample(tmp_path / "train", "a")
        add_sample(tmp_path / "test", "b")
    else:
        add_sample(tmp_path, "train_a")
        add_sample(tmp_path, "test_b")
    assert data.list_splits(tmp_path) == ["train", "test"]
    for split in ("val", "bogus"):
        with pytest.raises(DataError, match=f"no split '{split}'.*available splits: train, test") as err:
            load_dataset(tmp_path, split)
        assert str(tmp_path) in str(err.value)


def test_unknown_split_of_drive_lists_available() -> None:
    with pytest.raises(DataError, match="available: train, val, test") as err:
        load_dataset("drive-sample", "all")
    assert str(SAMPLE_DRIVE) in str(err.value)


# ------------------------------------------------------------------------------------------------- bad input


def _missing_mask(root: Path) -> tuple[Path, str]:
    image = save(root / "images" / "bad.png", make_image())
    return image, "no mask for image"


def _mask_other_size(root: Path) -> tuple[Path, str]:
    save(root / "images" / "bad.png", make_image(24, 32))
    return save(root / "masks" / "bad.png", make_mask(20, 32)), "20x32 .*24x32"


def _fov_other_size(root: Path) -> tuple[Path, str]:
    add_sample(root, "bad")
    return save(root / "fov" / "bad.png", np.full((24, 30), 255, np.uint8)), "FOV mask .*24x30 .*24x32"


def _unreadable_image(root: Path) -> tuple[Path, str]:
    add_sample(root, "bad")
    image = root / "images" / "bad.png"
    image.write_bytes(b"this is not a PNG file at all")
    return image, "cannot be read"


def _truncated_image(root: Path) -> tuple[Path, str]:
    add_sample(root, "bad")
    image = root / "images" / "bad.png"
    image.write_bytes(image.read_bytes()[:200])
    return image, "cannot be read"


def _empty_image(root: Path) -> tuple[Path, str]:
    add_sample(root, "bad")
    image = root / "images" / "bad.png"
    image.write_bytes(b"")
    return image, r"empty \(0 bytes\)"


def _empty_mask(root: Path) -> tuple[Path, str]:
    _, mask = add_sample(root, "bad")
    mask.write_bytes(b"")
    return mask, r"empty \(0 bytes\)"


def _many_valued_mask(root: Path) -> tuple[Path, str]:
    save(root / "images" / "bad.png", make_image())
    m = (np.arange(24 * 32).reshape(24, 32) % 7).astype(np.uint8)
    return save(root / "masks" / "bad.png", m), "has 7 distinct values.*at most two"


def _colour_mask(root: Path) -> tuple[Path, str]:
    save(root / "images" / "bad.png", make_image())
    m = np.zeros((24, 32, 3), np.uint8)
    m[3, :, 0] = 255  # a red line: channels differ
    return save(root / "masks" / "bad.png", m), "colour image"


def _mask_without_zero(root: Path) -> tuple[Path, str]:
    save(root / "images" / "bad.png", make_image())
    m = np.where(make_mask() > 0, 250, 3).astype(np.uint8)
    return save(root / "masks" / "bad.png", m), "neither is 0"


def _duplicate_id(root: Path) -> tuple[Path, str]:
    add_sample(root, "bad")
    first = save(root / "images" / "bad.jpg", make_image())  # the first of bad.jpg, bad.png is named
    return first, r"ambiguous.*\(bad\.jpg, bad\.png\)"


def _mask_wrong_format(root: Path) -> tuple[Path, str]:
    image = save(root / "images" / "bad.png", make_image())
    save(root / "masks" / "bad.tif", make_mask())
    return image, r"no mask for image .*found bad\.tif"


BAD_CASES = {
    "missing_mask": _missing_mask,
    "mask_other_size": _mask_other_size,
    "fov_other_size": _fov_other_size,
    "unreadable_image": _unreadable_image,
    "truncated_image": _truncated_image,
    "empty_image": _empty_image,
    "empty_mask": _empty_mask,
    "many_valued_mask": _many_valued_mask,
    "colour_mask": _colour_mask,
    "mask_without_zero": _mask_without_zero,
    "duplicate_id": _duplicate_id,
    "mask_wrong_format": _mask_wrong_format,
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_a_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    add_sample(tmp_path, "good")
    offending, pattern = BAD_CASES[case](tmp_path)
    with pytest.raises(DataError, match=pattern) as err:
        load_dataset(tmp_path)
    assert str(offending) in str(err.value)
    assert err.value.path == offending


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_skip_bad_drops_and_records(tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    add_sample(tmp_path, "good")
    offending, pattern = BAD_CASES[case](tmp_path)
    with caplog.at_level(logging.WARNING, logger="rl_seg.data"):
        ds = load_dataset(tmp_path, skip_bad=True)
    assert ds.ids() == ["good"]
    assert [s.path for s in ds.skipped] == [offending]
    assert str(offending) in ds.skipped[0].reason and re.search(pattern, ds.skipped[0].reason)
    assert "skipped 1 bad sample of 2" in caplog.text and str(offending) in caplog.text


def test_skip_bad_counts_several(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for stem in ("a", "c", "e"):
        add_sample(tmp_path, stem)
    save(tmp_path / "images" / "b.png", make_image())  # no mask
    save(tmp_path / "images" / "d.png", make_image())  # mask of another size
    save(tmp_path / "masks" / "d.png", make_mask(5, 5))
    with caplog.at_level(logging.WARNING, logger="rl_seg.data"):
        ds = load_dataset(tmp_path, "test", skip_bad=True)
    assert ds.ids() == ["a", "c", "e"]
    assert [s.path.name for s in ds.skipped] == ["b.png", "d.png"]
    assert "no mask for image" in ds.skipped[0].reason and "5x5" in ds.skipped[1].reason
    assert "skipped 2 bad samples of 5" in caplog.text


def test_everything_bad_is_still_an_error(tmp_path: Path) -> None:
    _missing_mask(tmp_path)
    with pytest.raises(DataError, match="no usable samples"):
        load_dataset(tmp_path, skip_bad=True)


def test_limit_reads_no_further(tmp_path: Path) -> None:
    add_sample(tmp_path, "a")
    _missing_mask(tmp_path)  # "bad" sorts after "a"
    assert load_dataset(tmp_path, limit=1).ids() == ["a"]


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    save(tmp_path / "masks" / "a.png", make_mask())
    with pytest.raises(DataError, match="no images in") as err:
        load_dataset(tmp_path)
    assert str(tmp_path / "images") in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images folder") as err:
        load_dataset(empty)
    assert str(empty / "images") in str(err.value)


def drive_copy(tmp_path: Path) -> Path:
    root = tmp_path / "DRIVE"
    shutil.copytree(SAMPLE_DRIVE / "test", root / "test")
    return root


def test_drive_missing_fov_or_manual(tmp_path: Path) -> None:
    root = drive_copy(tmp_path)
    fov = root / "test" / "mask" / "02_test_mask.gif"
    fov.unlink()
    with pytest.raises(DataError, match="no FOV mask") as err:
        load_dataset(root, "test")
    assert str(fov) in str(err.value)
    manual = root / "test" / "1st_manual" / "01_manual1.gif"
    manual.unlink()
    with pytest.raises(DataError, match="no usable samples"):
        load_dataset(root, "test", skip_bad=True)
    shutil.copy(SAMPLE_DRIVE / "test" / "mask" / "02_test_mask.gif", fov)
    ds = load_dataset(root, "test", skip_bad=True)
    assert ds.ids() == ["02"] and [s.path for s in ds.skipped] == [root / "test" / "images" / "01_test.tif"]
    assert str(manual) in ds.skipped[0].reason


def test_drive_split_absent_on_disk(tmp_path: Path) -> None:
    root = drive_copy(tmp_path)  # test/ only
    assert data.detect_layout(root) == "drive"
    assert data.list_splits(root) == ["test"]
    with pytest.raises(DataError, match=r"no split 'train'.*available: test"):
        load_dataset(root, "train")


# ------------------------------------------------------------------------------------------ readers directly


def test_read_image_conversions(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = read_image(save(tmp_path / "g.png", gray))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and (out == gray[..., None]).all()

    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    out = read_image(save(tmp_path / "a.png", rgba))
    assert out.shape == (3, 4, 3) and (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()

    g16 = np.array([[0, 257, 65535, 25700]], np.uint16)
    out = read_image(save(tmp_path / "g16.png", g16))
    assert out[0, :, 0].tolist() == [0, 1, 255, 100]

    pal = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 40, 50, 60])
    pal.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").tolist() == [[[10, 20, 30], [40, 50, 60]]]

    tif = tmp_path / "x.tif"
    Image.fromarray(make_image()).save(tif, compression="tiff_lzw")
    assert np.array_equal(read_image(tif), make_image())


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match="does not exist") as err:
        read_image(missing)
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty.png"
    empty.touch()
    with pytest.raises(DataError, match="empty") as err:
        read_image(empty)
    assert str(empty) in str(err.value)


def test_read_mask_accepts_binary_encodings(tmp_path: Path) -> None:
    expected = make_mask() > 0
    assert np.array_equal(read_mask(save(tmp_path / "01.png", expected.astype(np.uint8))), expected)
    bilevel = save(tmp_path / "bit.png", expected)
    with Image.open(bilevel) as im:
        assert im.mode == "1"
    assert np.array_equal(read_mask(bilevel), expected)
    rgb = np.repeat(make_mask()[..., None], 3, axis=2)
    assert np.array_equal(read_mask(save(tmp_path / "rgb.png", rgb)), expected)
    assert not read_mask(save(tmp_path / "zero.png", np.zeros((4, 4), np.uint8))).any()
    # DRIVE's second observer: palette GIF, background index 0 has colour (4, 2, 4)
    second = read_mask(SAMPLE_DRIVE / "test" / "2nd_manual" / "01_manual2.gif")
    first = read_mask(SAMPLE_DRIVE / "test" / "1st_manual" / "01_manual1.gif")
    assert 0.03 < second.mean() < 0.15 and (second & first).sum() > 0.6 * first.sum()


def test_read_mask_what_names_the_kind(tmp_path: Path) -> None:
    path = save(tmp_path / "f.png", np.arange(9, dtype=np.uint8).reshape(3, 3))
    with pytest.raises(DataError, match=r"^FOV mask .* has 9 distinct values") as err:
        read_mask(path, what="FOV mask")
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------- named datasets


def test_drive_name_resolves_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drive_copy(tmp_path)
    monkeypatch.setenv("RL_SEG_DATA_DIR", str(tmp_path))
    assert data.resolve_root("drive") == tmp_path / "DRIVE"
    ds = load_dataset("drive", "test")
    assert ds.name == "drive" and ds.ids() == ["01", "02"] and ds.root == tmp_path / "DRIVE"


def test_missing_named_dataset_suggests_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RL_SEG_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "SHARED_DATA_DIR", tmp_path / "no-shared")
    with pytest.raises(DataError) as err:
        data.resolve_root("arcade")
    message = str(err.value)
    assert str(tmp_path / "ARCADE_syntax") in message and str(tmp_path / "no-shared" / "ARCADE_syntax") in message
    assert "drive-sample" in message and "arcade-sample" in message and "RL_SEG_DATA_DIR" in message


def test_missing_path_suggests_samples(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        load_dataset(missing)
    assert str(missing) in str(err.value) and "drive-sample" in str(err.value)
    a_file = save(tmp_path / "f.png", make_mask())
    with pytest.raises(DataError, match="not a folder"):
        data.resolve_root(a_file)


def test_path_object_is_never_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    add_sample(tmp_path / "drive", "a")
    assert data.resolve_root(Path("drive")) == tmp_path / "drive"
    assert data.resolve_root("drive-sample") == SAMPLE_DRIVE


# ---------------------------------------------------------------------------------------------- full datasets


@pytest.mark.shared_data
def test_full_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"full datasets not present at {SHARED_DATA}")
    monkeypatch.delenv("RL_SEG_DATA_DIR", raising=False)
    drive = load_dataset("drive", "test")
    assert drive.root == SHARED_DATA / "DRIVE"
    assert drive.ids() == list(data.DRIVE_TEST_IDS) and not drive.skipped
    assert all(s.fov is not None and s.image.shape == (584, 565, 3) for s in drive)
    assert data.list_splits("arcade") == ["train", "val", "test"]
    sizes = {split: len(load_dataset("arcade", split)) for split in data.SPLITS}
    assert sizes == {"train": 300, "val": 100, "test": 100}
