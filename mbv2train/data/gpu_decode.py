"""The training-process side of `data.decode: device`: a batch of JPEG bytes -> uint8 images on the device.

torchvision's decode_jpeg decodes a list of JPEGs with nvJPEG when the device is a CUDA GPU and with
libjpeg-turbo when it is the CPU; everything after it (EXIF orientation, crop, resize, flip) is the same
tensor code on either device, so the CPU runs, and CI tests, every line of the GPU path. The random
draws were made in the workers (encoded.py); this module only carries them out. On CUDA the decoder gets
memory of its own (DecodeStream), so that it cannot overwrite memory the training step still reads.
"""

from __future__ import annotations

import io
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from mbv2train.config import DataConfig
from mbv2train.data.encoded import EncodedBatch
from mbv2train.data.folders import read_failure, to_rgb
from mbv2train.data.transforms import tensor_interpolation
from mbv2train.errors import DataError
from mbv2train.words import plural


def _decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which the GPU machines do not
        # have (0.26 does not warn); a warning per batch would flood the log.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)


# EXIF orientation -> what makes the stored pixels upright (C, H, W), as PIL's exif_transpose does.
_UPRIGHT = {
    1: lambda t: t,
    2: lambda t: t.flip(-1),  # mirrored
    3: lambda t: t.flip(-2, -1),  # upside down
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-2, -1),
    6: lambda t: t.transpose(-2, -1).flip(-1),  # stored on its side: turned 90 degrees clockwise
    7: lambda t: t.transpose(-2, -1).flip(-2, -1),
    8: lambda t: t.transpose(-2, -1).flip(-2),  # turned 90 degrees counter-clockwise
}


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    return _UPRIGHT[orientation](image)


class DecodeStream:
    """On CUDA, the stream a batch is decoded on: its own, so that nvJPEG only ever writes memory that no
    queued kernel still reads. On the CPU, nothing.

    torchvision's CUDA decode_jpeg allocates its output tensors on the caller's current stream, then has
    nvJPEG write them from a private stream that does not wait for the work queued on the caller's one
    (https://github.com/pytorch/vision/pull/9606 reproduces it deterministically; torchcodec fixed the same
    in its decoder, https://github.com/meta-pytorch/torchcodec/pull/1634). The caching allocator hands a
    block freed on a stream to the next allocation on that stream at once, since work on the stream runs in
    order. mbv2 decodes the next batch while the step's kernels are still queued (prefetch.py), after the
    host has freed tensors they have yet to read: decoding on the training stream would let nvJPEG overwrite
    them before they are read, silently changing the step.

    Decoding with a stream of its own current, the outputs come from that stream's pool, which holds only
    decoder outputs: the training stream never frees into it. ``hand_over`` makes the training stream wait
    for the decode stream and records each output's use on the training stream, so the allocator gives an
    output's block back to the decoder only once the training work queued before its release has finished.
    Making nvJPEG's stream wait for the training stream instead would not do: torchvision does not expose
    that stream, and torchcodec found that nvJPEG's hardware engine does not keep to a stream's order.
    The cost: the decode stream's pool keeps its own blocks for the full-size decoded images of the
    batches in flight.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._streams: dict[int, torch.cuda.Stream] = {}  # per GPU; made on first use, in the process using it

    def current(self):
        """A context in which the decoder's allocations and copies go to its own stream."""
        if self.device.type != "cuda":
            return nullcontext()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=index)
        return torch.cuda.stream(self._streams[index])

    def hand_over(self, images: Iterable[torch.Tensor]) -> None:
        """Make ``images``, decoded under ``current()``, safe to use and to free on the training stream."""
        if self.device.type != "cuda":
            return
        training = torch.cuda.current_stream(self.device)
        training.wait_stream(self._streams[training.device.index])
        for image in images:
            image.record_stream(training)


@dataclass
class DecodeWait:
    """How long the host spent inside the decoder's calls, and for how many batches. torchvision's CUDA
    decode returns only after it has synchronized nvJPEG's stream (a wait that torch's sync debug mode
    cannot see), so on a GPU this is the host's wait for the decode."""

    seconds: float = 0.0
    batches: int = 0


class BatchDecoder:
    """(EncodedBatch, labels, bad paths) -> (uint8 images (N, 3, S, S) on ``device``, labels, bad paths).

    Training crops each JPEG's window, resizes it to image_size (antialiased) and flips it as drawn;
    validation resizes the short side to val_resize and crops the center val_crop, as the PIL pipeline.
    A JPEG that no decoder can read is unreadable as with `data.decode: workers`: with ``bad_images``
    "error" a DataError names it; with "skip" it takes the image and label of the next readable image of
    the batch (wrapping around), and its path joins the batch's bad paths so the run warns and counts it.
    """

    def __init__(self, cfg: DataConfig, train: bool, device: Union[str, torch.device], bad_images: str = "error"):
        self.device = torch.device(device)
        self.train = train
        self.interpolation = tensor_interpolation(cfg)
        self.image_size, self.val_resize, self.val_crop = cfg.image_size, cfg.val_resize, cfg.val_crop
        self.bad_images = bad_images
        self.stream = DecodeStream(self.device)
        self.waited = DecodeWait()

    def __call__(self, batch: EncodedBatch, labels: torch.Tensor, bad=()) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        images: list[Optional[torch.Tensor]] = [None] * batch.size
        done = batch.decoded.to(self.device, non_blocking=True)
        for k, position in enumerate(batch.decoded_positions):
            images[position] = done[k]
        failures: dict[int, DataError] = {}
        for j, result in enumerate(self._decode(batch)):
            if isinstance(result, DataError):
                failures[batch.positions[j]] = result
            else:
                images[batch.positions[j]] = self._finish(*result, batch, j)
        found: tuple[str, ...] = ()
        if failures:
            labels, found = self._replace_unreadable(images, labels, failures, batch)
        return torch.stack(images), labels, tuple(bad) + found

    # ------------------------------------------------------------------------------------ decoding

    def _decode(self, batch: EncodedBatch) -> list[Union[tuple[torch.Tensor, bool], DataError]]:
        """Per JPEG: (decoded image, whether it is already upright) or the DataError naming it."""
        jpegs = batch.jpegs()
        if not jpegs:
            return []
        self.waited.batches += 1
        with self.stream.current():  # never on the training stream's memory: see DecodeStream
            try:  # the whole batch in one call: nvJPEG decodes it in parallel on the GPU
                results = [(image, False) for image in self._timed_decode(jpegs)]
            except RuntimeError:  # one bad file fails the whole call; find it
                results = [self._decode_one(data, path) for data, path in zip(jpegs, batch.paths)]
        self.stream.hand_over(result[0] for result in results if not isinstance(result, DataError))
        return results

    def _timed_decode(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        started = time.perf_counter()
        try:
            return _decode_jpegs(jpegs, self.device)
        finally:
            self.waited.seconds += time.perf_counter() - started

    def _decode_one(self, data: torch.Tensor, path: str) -> Union[tuple[torch.Tensor, bool], DataError]:
        try:
            return self._timed_decode([data])[0], False
        except RuntimeError:
            pass
        # PIL has the last word, as in the workers: a file it reads is readable (and comes out upright).
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                pixels = F.pil_to_tensor(to_rgb(img))
        except Exception as e:  # noqa: BLE001 - as folders.load_image: any failure of PIL on these bytes
            return DataError(f"cannot read image {path}: {read_failure(path, e)}")
        return pixels.to(self.device), True

    def _finish(self, image: torch.Tensor, is_upright: bool, batch: EncodedBatch, j: int) -> torch.Tensor:
        if image.shape[0] == 1:  # a decoder that kept a grayscale JPEG's single channel
            image = image.expand(3, -1, -1)
        if not is_upright:
            image = upright(image, batch.orientations[j])
        if not self.train:
            image = F.resize(image, [self.val_resize], interpolation=self.interpolation, antialias=True)
            return F.center_crop(image, [self.val_crop, self.val_crop])
        top, left, height, width = batch.windows[j]
        image = F.resized_crop(image, top, left, height, width, [self.image_size, self.image_size],
                               interpolation=self.interpolation, antialias=True)
        return image.flip(-1) if batch.flips[j] else image

    # ------------------------------------------------------------------------------------ unreadable files

    def _replace_unreadable(self, images: list, labels: torch.Tensor, failures: dict[int, DataError],
                            batch: EncodedBatch) -> tuple[torch.Tensor, tuple[str, ...]]:
        first = min(failures)
        if self.bad_images == "error":
            raise failures[first]
        readable = [i for i, image in enumerate(images) if image is not None]
        if not readable:
            raise DataError(f"none of the {plural(batch.size, 'image')} of a batch can be read; the first: "
                            f"{failures[first]}")
        labels = labels.clone()
        for position in failures:
            # the first readable image after it in the batch, wrapping around: the same batch always
            # gets the same replacement, so a resumed run still trains on what the whole run did
            source = min(readable, key=lambda i: (i - position) % batch.size)
            images[position], labels[position] = images[source], labels[source]
        paths = {position: path for position, path in zip(batch.positions, batch.paths)}
        return labels, tuple(paths[position] for position in sorted(failures))


class DeviceDecodingLoader:
    """A DataLoader of EncodedBatches that yields decoded batches, as a workers-decoding loader does:
    (uint8 images on the device, labels, bad paths). Everything else (len, dataset, sampler,
    batch_size, num_workers) is the wrapped loader's."""

    def __init__(self, loader, decoder: BatchDecoder):
        self.loader = loader
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.decoder(*batch)

    def collate_fn(self, items):
        """Items of the dataset -> a decoded batch (as the loader yields it)."""
        return self.decoder(*self.loader.collate_fn(items))

    def __getattr__(self, name: str):
        if name in ("loader", "decoder"):  # not set yet (copy, pickle): no endless lookup
            raise AttributeError(name)
        return getattr(self.loader, name)
