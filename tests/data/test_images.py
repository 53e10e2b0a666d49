"""Image backends: same pixels as an independent resampler, and as each other (within 1/255)."""

import numpy as np
import pytest
import torch

from pivot_mega.data.images import DaliDecoder, PillowDecoder, dali_unavailable_reason, decode_rgb, make_image_decoder
from pivot_mega.data.sources import DataError
from tests.data.helpers import encode, photo

NO_DALI = dali_unavailable_reason()
needs_dali = pytest.mark.skipif(NO_DALI is not None, reason=str(NO_DALI))


def _weights(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` antialiased triangle-filter weights, edge pixels repeated past the border."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for out in range(out_size):
        center = (out + 0.5) * scale
        taps = np.arange(int(np.floor(center - support)) - 1, int(np.ceil(center + support)) + 2)
        w = np.maximum(0.0, 1.0 - np.abs(taps + 0.5 - center) / support)
        np.add.at(weights[out], np.clip(taps, 0, in_size - 1), w / w.sum())
    return weights


def reference(data: bytes, size: int) -> np.ndarray:
    """``[3, size, size]`` float64, SigLIP-normalised, computed in float64 from the decoded pixels."""
    rgb = decode_rgb(data).astype(np.float64)
    rows = np.tensordot(_weights(rgb.shape[0], size), rgb, axes=(1, 0))  # [size, W, 3]
    resized = np.tensordot(_weights(rgb.shape[1], size), rows, axes=(1, 1))  # [size (x), size (y), 3]
    return resized.transpose(2, 1, 0) / 127.5 - 1.0


def _images(rng, count=10):
    shapes = [(int(rng.integers(8, 700)), int(rng.integers(8, 700))) for _ in range(count - 3)]
    shapes += [(1, 1), (3, 500), (384, 384)]
    formats = [("JPEG", {"quality": 90}), ("PNG", {}), ("JPEG", {"progressive": True}), ("WEBP", {"quality": 80})]
    out = []
    for k, (h, w) in enumerate(shapes):
        fmt, args = formats[k % len(formats)]
        out.append(encode(photo(rng, h, w), fmt, **args))
    out.append(encode(photo(rng, 50, 70), "JPEG", mode="L"))
    return out


def _levels(a, b) -> float:
    """Largest difference in 0..255 pixel levels between two normalised tensors."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() * 127.5)


@pytest.mark.parametrize("decoder, tolerance", [
    (PillowDecoder, 0.01),
    pytest.param(DaliDecoder, 0.05, marks=needs_dali),
], ids=["python", "dali"])
def test_backend_matches_the_reference_resampler(decoder, tolerance, seed):
    rng = np.random.default_rng(seed)
    size = int(rng.choice([32, 96, 384]))
    images = _images(rng)
    out = decoder(size, num_threads=2)(images)
    assert out.shape == (len(images), 3, size, size) and out.dtype == torch.float32
    for k, data in enumerate(images):
        assert _levels(out[k], reference(data, size)) < tolerance, k


@needs_dali
def test_dali_and_python_give_the_same_pixels(seed):
    rng = np.random.default_rng(seed)
    images = _images(rng, 12)
    for size in (64, 384):
        dali, python = DaliDecoder(size, 2)(images), PillowDecoder(size, 2)(images)
        assert _levels(dali, python) <= 0.05  # 1/255 is the requirement; they agree far closer
    # Decoding itself is bit-exact (libjpeg-turbo, libpng, libwebp on both sides): an image already at
    # the target size comes through unchanged.
    square = [encode(photo(rng, 48, 48), fmt, **args) for fmt, args in
              [("JPEG", {"subsampling": 2}), ("JPEG", {"subsampling": 0}), ("PNG", {}), ("WEBP", {"quality": 70})]]
    expected = np.stack([decode_rgb(b).transpose(2, 0, 1) / 127.5 - 1 for b in square])
    assert _levels(DaliDecoder(48, 1)(square), expected) < 1e-3
    assert _levels(PillowDecoder(48, 1)(square), expected) < 1e-3


def test_siglip_normalisation_and_empty_batches():
    colour = np.zeros((20, 30, 3), dtype=np.uint8) + np.array([0, 128, 255], dtype=np.uint8)
    out = PillowDecoder(16)([encode(colour, "PNG")])
    assert torch.allclose(out[0, :, 5, 5], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)
    assert PillowDecoder(16)([]).shape == (0, 3, 16, 16)


@needs_dali
def test_backend_choice():
    assert make_image_decoder("auto", image_size=8).name == "dali"
    assert make_image_decoder("python", image_size=8).name == "python"
    assert DaliDecoder(8)([]).shape == (0, 3, 8, 8)
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="'mixed' decodes on a GPU: this process has no CUDA device"):
            DaliDecoder(8, device="mixed", device_id=0)


@pytest.mark.skipif(NO_DALI is not None or not torch.cuda.is_available(),
                    reason=str(NO_DALI or "GPU decoding (decode_device: mixed) needs a CUDA device"))
def test_gpu_decoding_matches_the_cpu_backend(seed):
    rng = np.random.default_rng(seed)
    images = _images(rng)
    gpu = DaliDecoder(384, 2, device="mixed", device_id=torch.cuda.current_device())(images)
    assert gpu.is_cuda
    # nvJPEG's IDCT differs from libjpeg-turbo's by a level or two on some pixels.
    assert _levels(gpu.cpu(), PillowDecoder(384, 2)(images)) <= 3.0
