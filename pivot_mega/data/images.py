"""Image decoding backends: encoded bytes → SigLIP-normalised ``[N, 3, S, S]`` float32 tensors.

Both backends decode to RGB, resize to the ViT's square size with an antialiased bilinear (triangle)
filter and normalise with mean 0.5 and std 0.5 (``x / 127.5 - 1``), giving the same pixels within
1/255 (the python backend reproduces DALI's resampling, see ``resize_like_dali``).

- ``DaliDecoder``: a DALI pipeline (``fn.decoders.image`` on the CPU, or ``mixed``: nvJPEG on the
  GPU, output on the GPU) → ``fn.resize`` → ``fn.crop_mirror_normalize``.
- ``PillowDecoder``: PIL decode and resize in a thread pool (PIL releases the GIL in both).

EXIF orientation is ignored by both, as LLaVA's ``Image.open(...).convert("RGB")`` (and so PIVOT)
ignores it.
"""

from __future__ import annotations

import importlib.util
import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .sources import DataError

# DALI's pipelines run batches of at most this many images; larger requests are split.
DALI_MAX_BATCH = 64


def dali_unavailable_reason() -> str | None:
    """Why the DALI backend cannot run here, or None when it can."""
    try:
        if importlib.util.find_spec("nvidia.dali") is None:
            return "nvidia-dali is not installed (pip install nvidia-dali-cuda120)"
    except (ImportError, ValueError):
        return "nvidia-dali is not installed (pip install nvidia-dali-cuda120)"
    return None


def resize_like_dali(rgb: np.ndarray, size: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 → ``[size, size, 3]`` float32 in 0..255, as DALI's antialiased linear resize.

    PIL's BILINEAR is the same triangle filter but renormalises the weights that fall outside the
    image, where DALI repeats the edge pixels; up to 18 levels apart on the outermost rows and
    columns. Edge-padding the image and resizing the original area (``box``) makes PIL use DALI's
    edge rule; resizing in float ("F" mode) avoids PIL's rounding to uint8 between its two passes.
    """
    from PIL import Image

    height, width = rgb.shape[:2]
    # Filter support is the scale factor (at least 1) in source pixels; pad a little beyond it.
    pad_y, pad_x = math.ceil(height / size) + 1, math.ceil(width / size) + 1
    padded = np.pad(rgb, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="edge").astype(np.float32)
    box = (pad_x, pad_y, pad_x + width, pad_y + height)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(padded[..., c]), mode="F")
                                .resize((size, size), Image.Resampling.BILINEAR, box=box))
                     for c in range(3)], axis=-1)


class UndecodableImages(DataError):
    """Images of a decoder call that do not decode: ``problems`` maps their position in the call to why.

    The decoders know bytes, not files: the loader names the shard, member and sample.
    """

    def __init__(self, problems: dict[int, str]):
        super().__init__("; ".join(f"image {k}: {why}" for k, why in sorted(problems.items())))
        self.problems = problems


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image → ``[H, W, 3]`` uint8 RGB (no EXIF rotation)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decode_problem(error: Exception) -> str:
    """One line for why PIL could not decode an image (its own names a BytesIO object, not a file)."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image PIL can read"
    return f"{type(error).__name__}: {error}"


def pillow_problems(encoded: list[bytes]) -> dict[int, str]:
    """{position: why} of the images PIL cannot decode."""
    problems = {}
    for k, data in enumerate(encoded):
        try:
            decode_rgb(data)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            problems[k] = decode_problem(e)
    return problems


class PillowDecoder:
    """The python backend: PIL decode + ``resize_like_dali`` + normalisation, ``num_threads`` threads."""

    name = "python"

    def __init__(self, image_size: int, num_threads: int = 1):
        self.image_size = image_size
        self._pool = ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def _one(self, data: bytes) -> np.ndarray | str:
        try:
            rgb = decode_rgb(data)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return decode_problem(e)
        pixels = resize_like_dali(rgb, self.image_size)
        return (pixels / np.float32(127.5) - np.float32(1.0)).transpose(2, 0, 1)

    def __call__(self, encoded: list[bytes]) -> torch.Tensor:
        """Raises UndecodableImages naming every image of the call that does not decode."""
        if not encoded:
            return torch.empty(0, 3, self.image_size, self.image_size)
        images = list(self._pool.map(self._one, encoded)) if self._pool else [self._one(b) for b in encoded]
        problems = {k: image for k, image in enumerate(images) if isinstance(image, str)}
        if problems:
            raise UndecodableImages(problems)
        return torch.from_numpy(np.stack(images))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class DaliDecoder:
    """The DALI backend. ``device='cpu'``: everything on the host; ``'mixed'``: decode on GPU
    ``device_id`` (JPEG with nvJPEG, the chroma upsampling of libjpeg-turbo) and return CUDA tensors."""

    name = "dali"

    def __init__(self, image_size: int, num_threads: int = 1, device: str = "cpu", device_id: int | None = None):
        reason = dali_unavailable_reason()
        if reason:
            raise DataError(f"data.backend 'dali': {reason}")
        if device == "mixed" and (device_id is None or not torch.cuda.is_available()):
            raise DataError("data.decode_device 'mixed' decodes on a GPU: this process has no CUDA device")
        self.image_size, self.device = image_size, device
        self.device_id = device_id if device == "mixed" else None
        self._pipe = self._build(num_threads)

    def _build(self, num_threads: int):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=DALI_MAX_BATCH, num_threads=num_threads, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            images = fn.decoders.image(encoded, device=self.device, output_type=types.RGB,
                                       adjust_orientation=False, jpeg_fancy_upsampling=True)
            images = fn.resize(images, resize_x=self.image_size, resize_y=self.image_size,
                               interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
            return fn.crop_mirror_normalize(images, mean=[127.5] * 3, std=[127.5] * 3,
                                            output_layout="CHW", dtype=types.FLOAT)

        pipe = pipeline()
        pipe.build()
        return pipe

    def __call__(self, encoded: list[bytes]) -> torch.Tensor:
        """Raises UndecodableImages naming the images PIL cannot decode either when DALI fails."""
        if not encoded:
            device = f"cuda:{self.device_id}" if self.device == "mixed" else "cpu"
            return torch.empty(0, 3, self.image_size, self.image_size, device=device)
        try:
            chunks = [self._run(encoded[i:i + DALI_MAX_BATCH]) for i in range(0, len(encoded), DALI_MAX_BATCH)]
        except RuntimeError as e:
            # DALI's error does not say which image of the batch failed; PIL does, and failures are rare.
            problems = pillow_problems(encoded)
            if not problems:
                raise DataError(f"data.backend 'dali' failed on images PIL decodes: {e}") from e
            raise UndecodableImages(problems) from None
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _run(self, encoded: list[bytes]) -> torch.Tensor:
        self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in encoded])
        (images,) = self._pipe.run()
        dense = images.as_tensor()
        if self.device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(dense.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device_id))
            return out
        return torch.from_numpy(np.array(dense))

    def close(self) -> None:
        self._pipe = None


def make_image_decoder(backend: str, *, image_size: int, num_threads: int = 1, decode_device: str = "cpu",
                       device_id: int | None = None) -> PillowDecoder | DaliDecoder:
    """``backend``: ``dali``, ``python``, or ``auto`` (DALI when installed, else python)."""
    if backend == "auto":
        backend = "python" if dali_unavailable_reason() else "dali"
    if backend == "dali":
        return DaliDecoder(image_size, num_threads, decode_device, device_id)
    if backend == "python":
        return PillowDecoder(image_size, num_threads)
    raise DataError(f"data.backend {backend!r} is not one of auto, dali, python")
