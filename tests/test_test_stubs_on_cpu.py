"""The TEST STUB torchvision and timm (tests/stubs) that let Sa2VA's remote code import on machines without a
working torchvision: conftest puts them on the path only for packages that are missing, Ray workers inherit them,
and what they implement behaves as torchvision/timm do on PIL images."""

import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import STUBBED_PACKAGES, STUBS, stub_root


def _from_stub(name: str) -> bool:
    origin = importlib.util.find_spec(name).origin or ""
    return str(STUBS) in origin or "rl-seg-test-stubs" in origin


def test_stub_root_exposes_only_the_missing_packages():
    assert stub_root([]) is None
    assert stub_root(list(STUBBED_PACKAGES)) == STUBS
    only_timm = stub_root(["timm"])
    assert sorted(p.name for p in only_timm.iterdir()) == ["_test_stub_support.py", "timm"]
    assert (only_timm / "timm").resolve() == STUBS / "timm"


def test_missing_packages_resolve_to_the_stubs_here_and_in_subprocesses():
    for name in STUBBED_PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None, f"{name} neither installed nor stubbed"
    stubbed = [name for name in STUBBED_PACKAGES if _from_stub(name)]
    if not stubbed:
        pytest.skip("real torchvision and timm installed: no stub in use")
    # A Ray worker is a fresh interpreter that only sees PYTHONPATH.
    code = ("import importlib.util, timm, qwen_vl_utils; from timm.models.layers import DropPath; "
            "from qwen_vl_utils import process_vision_info; "
            "print(*[importlib.util.find_spec(n).origin for n in %r])" % (stubbed,))
    out = subprocess.run([sys.executable, "-W", "ignore::FutureWarning", "-c", code], env=dict(os.environ),
                         capture_output=True, text=True, cwd="/", check=True).stdout.split()
    assert all("stub" in origin for origin in out), out


def test_timm_drop_path_as_timm():
    import timm  # noqa: F401

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import importlib

        layers = importlib.reload(importlib.import_module("timm.models.layers"))
    if _from_stub("timm"):
        assert any(issubclass(w.category, FutureWarning) for w in caught)
    drop = layers.DropPath(0.25)
    x = torch.ones(4000, 3)
    drop.eval()
    assert drop(x) is x
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    kept = y[:, 0] != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert (y[~kept] == 0).all() and (y == y[:, :1]).all(), "whole samples are dropped"
    assert repr(layers.DropPath(0.1234)) == "DropPath(drop_prob=0.123)"
    assert layers.DropPath(0.0).train()(x) is x


def test_tile_transform_matches_pil_arithmetic():
    """Sa2VA's tile transform: RGB, bicubic resize to 448, [0, 1] floats, then (x - mean) / std."""
    import torchvision.transforms as T
    from torchvision.transforms.functional import InterpolationMode

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8))  # grey: converted to RGB first
    transform = T.Compose([
        T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
        T.Resize((448, 448), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=mean, std=std),
    ])
    out = transform(image)
    resized = np.asarray(image.convert("RGB").resize((448, 448), Image.Resampling.BICUBIC))
    expected = torch.from_numpy(resized.transpose(2, 0, 1).copy()).float().div(255)
    expected = expected.sub(torch.tensor(mean).view(3, 1, 1)).div(torch.tensor(std).view(3, 1, 1))
    assert out.shape == (3, 448, 448) and out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_resize_sizes_and_to_pil_image_as_torchvision():
    from torchvision.transforms.functional import InterpolationMode, resize, to_pil_image

    array = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image = to_pil_image(array, mode="RGB")
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), array)
    # An int sets the shorter side and truncates the longer (torchvision 0.28 gives these sizes).
    assert resize(image, 20).size == (28, 20)
    assert resize(image, [20]).size == (28, 20)
    assert resize(image, (10, 11), InterpolationMode.NEAREST).size == (11, 10)
    assert resize(image, 100, max_size=120).size == (120, 83)
    assert resize(image, (37, 53)) is image
    with pytest.raises(ValueError, match="Only modes"):
        to_pil_image(array, mode="L")
    assert to_pil_image(torch.ones(1, 4, 5)).mode == "L"


def test_what_the_stub_lacks_names_the_stub():
    if not _from_stub("torchvision"):
        pytest.skip("real torchvision installed")
    import torchvision
    from torchvision.transforms.functional import resize

    with pytest.raises(NotImplementedError, match=r"TEST STUB torchvision .*'torchvision.ops'"):
        torchvision.ops
    with pytest.raises(NotImplementedError, match="read_video"):
        from torchvision.io import read_video  # noqa: F401
    with pytest.raises(NotImplementedError, match="PIL images only"):
        resize(torch.zeros(3, 8, 8), 4)
    assert not hasattr(torchvision, "_private_probe")


def test_transformers_imports_its_torchvision_names_from_the_stub():
    """transformers 5 counts any importable torchvision as available (4.x also wants its package metadata, which
    the stub has not) and then imports a few names at module level: they must import from the stub."""
    from transformers.image_utils import pil_torch_interpolation_mapping
    from transformers.utils import is_torchvision_available

    assert len(pil_torch_interpolation_mapping) == (6 if is_torchvision_available() else 0)
    if int(__import__("transformers").__version__.split(".")[0]) >= 5:
        assert is_torchvision_available()
