"""TEST STUB of torchvision.transforms.functional: resize (PIL images), to_pil_image (arrays and tensors),
to_tensor and pil_to_tensor (PIL images and arrays), normalize (float tensors), with torchvision 0.28's rules:
the same output sizes, PIL resampling filters, modes, dtypes and arithmetic order, so the pixels match."""

import sys
from enum import Enum

import numpy as np
import torch
from PIL import Image
from _test_stub_support import missing, module_getattr


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


# The PIL resampling filter torchvision uses for each mode (nearest-exact is PIL's nearest).
_PIL_FILTER = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}
# torchvision accepts PIL's integer filter constants in place of a mode.
_MODE_OF_PIL_INT = {0: InterpolationMode.NEAREST, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
                    3: InterpolationMode.BICUBIC, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}
# PIL modes whose pixels are not bytes, and the array dtype torchvision reads them as.
_NON_BYTE_MODES = {"I": np.int32, "I;16" if sys.byteorder == "little" else "I;16B": np.int16, "F": np.float32}


def _as_interpolation_mode(interpolation):
    if isinstance(interpolation, int):
        return _MODE_OF_PIL_INT[interpolation]
    if not isinstance(interpolation, InterpolationMode):
        raise TypeError("Argument interpolation should be a InterpolationMode or a corresponding Pillow integer "
                        "constant")
    return interpolation


def _output_size(height: int, width: int, size, max_size):
    """[new_h, new_w]: both given, or the shorter side set to ``size`` keeping the aspect ratio (truncated),
    then capped at ``max_size`` on the longer side."""
    if isinstance(size, int):
        size = [size]
    if len(size) == 2:
        return [size[0], size[1]]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size[0], int(size[0] * long / short)
    if max_size is not None:
        if max_size <= size[0]:
            raise ValueError(f"max_size = {max_size} must be strictly greater than the requested size for the "
                             f"smaller edge size = {size}")
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return [new_long, new_short] if width <= height else [new_short, new_long]


def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    interpolation = _as_interpolation_mode(interpolation)
    if isinstance(size, (list, tuple)):
        if len(size) not in (1, 2):
            raise ValueError(f"Size must be an int or a 1 or 2 element tuple/list, not a {len(size)} element "
                             f"tuple/list")
        if max_size is not None and len(size) != 1:
            raise ValueError("max_size should only be passed if size specifies the length of the smaller edge")
    if not isinstance(img, Image.Image):
        raise missing("torchvision", f"transforms.functional.resize of a {type(img).__name__} (PIL images only)")
    width, height = img.size
    new_h, new_w = _output_size(height, width, size, max_size)
    if (new_h, new_w) == (height, width):
        return img
    # PIL always antialiases bilinear/bicubic downscaling; torchvision ignores `antialias` for PIL images.
    return img.resize((new_w, new_h), _PIL_FILTER[interpolation])


def to_tensor(pic):
    """CHW tensor; bytes scaled to [0, 1] in the default float dtype, other dtypes kept as they are."""
    if isinstance(pic, np.ndarray):
        if pic.ndim not in (2, 3):
            raise ValueError(f"pic should be 2/3 dimensional. Got {pic.ndim} dimensions.")
        array = pic[:, :, None] if pic.ndim == 2 else pic
        img = torch.from_numpy(array.transpose((2, 0, 1))).contiguous()
    elif isinstance(pic, Image.Image):
        img = torch.from_numpy(np.array(pic, _NON_BYTE_MODES.get(pic.mode, np.uint8), copy=True))
        if pic.mode == "1":
            img = 255 * img
        img = img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1)).contiguous()
    else:
        raise TypeError(f"pic should be PIL Image or ndarray. Got {type(pic)}")
    if img.dtype == torch.uint8:
        return img.to(dtype=torch.get_default_dtype()).div(255)
    return img


def pil_to_tensor(pic):
    """CHW tensor of the image's own dtype (no scaling)."""
    if not isinstance(pic, Image.Image):
        raise TypeError(f"pic should be PIL Image. Got {type(pic)}")
    img = torch.as_tensor(np.array(pic, copy=True))
    return img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1))


def normalize(tensor, mean, std, inplace=False):
    """(x - mean) / std per channel, in the tensor's dtype (mean and std are cast to it first)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"img should be Tensor Image. Got {type(tensor)}")
    if not tensor.is_floating_point():
        raise TypeError(f"Input tensor should be a float tensor. Got {tensor.dtype}.")
    if tensor.ndim < 3:
        raise ValueError(f"Expected tensor to be a tensor image of size (..., C, H, W). Got tensor.size() = "
                         f"{tensor.size()}")
    if not inplace:
        tensor = tensor.clone()
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    if (std == 0).any():
        raise ValueError(f"std evaluated to zero after conversion to {tensor.dtype}, leading to division by zero.")
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


# The PIL mode an HWC array becomes, by channel count and dtype, when no mode is asked for.
_MODE_OF_ARRAY = {(1, np.uint8): "L", (1, np.int16): "I;16" if sys.byteorder == "little" else "I;16B",
                  (1, np.int32): "I", (1, np.float32): "F", (2, np.uint8): "LA", (3, np.uint8): "RGB",
                  (4, np.uint8): "RGBA"}
_PERMITTED_MODES = {2: ["LA"], 3: ["RGB", "YCbCr", "HSV"], 4: ["RGBA", "CMYK", "RGBX"]}


def to_pil_image(pic, mode=None):
    """A PIL image of an HWC array or a CHW tensor (floats are scaled by 255 to bytes unless mode is "F").

    Only the modes the data already is (e.g. uint8 with 3 channels as "RGB") are implemented; torchvision's
    reinterpreting conversions (3 channels as "YCbCr"/"HSV", 4 as "CMYK"/"RGBX") raise NotImplementedError."""
    if isinstance(pic, torch.Tensor):
        if pic.ndim == 3:
            pic = pic.permute((1, 2, 0))
        pic = pic.numpy(force=True)
    elif not isinstance(pic, np.ndarray):
        raise TypeError(f"pic should be Tensor or ndarray. Got {type(pic)}.")
    if pic.ndim == 2:
        pic = np.expand_dims(pic, 2)
    if pic.ndim != 3:
        raise ValueError(f"pic should be 2/3 dimensional. Got {pic.ndim} dimensions.")
    if pic.shape[-1] > 4:
        raise ValueError(f"pic should not have > 4 channels. Got {pic.shape[-1]} channels.")
    if np.issubdtype(pic.dtype, np.floating) and mode != "F":
        pic = (pic * 255).astype(np.uint8)
    channels = pic.shape[2]
    inferred = _MODE_OF_ARRAY.get((channels, pic.dtype.type))
    if channels == 1:
        pic = pic[:, :, 0]
        if mode is not None and mode != inferred:
            raise ValueError(f"Incorrect mode ({mode}) supplied for input type {pic.dtype}. Should be {inferred}")
    elif mode is not None and mode not in _PERMITTED_MODES[channels]:
        raise ValueError(f"Only modes {_PERMITTED_MODES[channels]} are supported for {channels}D inputs")
    if mode is None:
        if inferred is None:
            raise TypeError(f"Input type {pic.dtype} is not supported")
        mode = inferred
    if mode != inferred:
        raise missing("torchvision", f"transforms.functional.to_pil_image to mode {mode!r} from "
                                     f"{channels}-channel {pic.dtype} data")
    return Image.fromarray(np.ascontiguousarray(pic))


__getattr__ = module_getattr("torchvision", __name__)
