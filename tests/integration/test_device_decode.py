"""data.decode: device: JPEG bytes from the workers, decoded batch-wise in the training process (nvJPEG on
CUDA, libjpeg-turbo on the CPU, the same code after the decoder).

Tolerance (measured on these photo crops): against the workers loader, which crops and resizes JPEGs with
the same tensor ops, the batches came out identical; against the PIL pipeline (bilinear) they differ by
resampling rounding only, both decoders being libjpeg-turbo with the same IDCT: at most 1 level, mean at
most 0.11 level. 2 levels and a mean of 0.25 are allowed.
"""

import dataclasses
import io
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from helpers import (SMALL_STEPS, TINY_RUN, LineReader, metric_rows, progress_line, read_events, run_ckpt,
                     run_metrics, same_state, start, train_args, truncated_jpeg)
from mbv2train import data
from mbv2train.config import load_config
from mbv2train.data.encoded import EncodedBatch, EncodedJpeg, collate_encoded, jpeg_header
from mbv2train.data.folders import to_rgb
from mbv2train.data.gpu_decode import BatchDecoder, _decode_jpegs, upright
from mbv2train.errors import ConfigError, DataError
from mbv2train.train.trainer import fit

# the JPEG sets and the device-decoding run (module fixtures) are built once, on one worker
pytestmark = pytest.mark.xdist_group("device_decode")

MAX_DIFF, MAX_MEAN_DIFF = 2, 0.25


def photo(seed: int, height: int = 150, width: int = 200) -> np.ndarray:
    """A crop of one of scikit-learn's sample photos (real-photo statistics, no download)."""
    from sklearn.datasets import load_sample_image

    image = load_sample_image(("china.jpg", "flower.jpg")[seed % 2])
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, image.shape[0] - height), rng.integers(0, image.shape[1] - width)
    return image[top:top + height, left:left + width]


def jpeg_bytes(pixels: np.ndarray, orientation: int = 1, quality: int = 90, mode: str = "RGB") -> bytes:
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def undecodable_jpeg() -> bytes:
    """A JPEG whose header PIL reads and whose scan ends with an end-of-image marker, but whose scan
    header is broken: no decoder reads it, so it fails only when the batch is decoded."""
    data = bytearray(jpeg_bytes(photo(0, 64, 64)))
    scan = data.rfind(b"\xff\xda")
    data[scan + 2:scan + 4] = b"\x00\x01"  # an impossible segment length
    return bytes(data)


def write_photo_folder(root, shapes=((150, 200), (200, 150), (120, 260)), per_class=4, orientations=(1,)):
    """root/{train,val}/{a,b}/*.jpg of photo crops, various shapes; one grayscale JPEG per class."""
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed = 100 * c + 10 * i + (split == "val")
                shape = shapes[i % len(shapes)]
                mode = "L" if i == 1 else "RGB"
                orientation = orientations[i % len(orientations)]
                (folder / f"{i}.jpg").write_bytes(jpeg_bytes(photo(seed, *shape), orientation, mode=mode))
    return root


def write_tinted_jpegs(root, classes=("red", "green", "blue"), train_per_class=8, val_per_class=4):
    """A learnable JPEG ImageFolder (each class its own tint) of small images of a few sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = 24 + 4 * (i % 3), 32 - 4 * (i % 2)
                pixels = rng.integers(0, 90, (height, width, 3))
                pixels[..., c % 3] += 160
                (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(pixels.clip(0, 255).astype("uint8")))
    return root


def data_cfg(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.image_size=64", "data.val_resize=72",
                              "data.val_crop=64", "data.batch_size=4", "data.num_workers=0", *overrides]).data


def loaders(cfg, decode: str, seed: int = 7):
    return data.build_loaders(dataclasses.replace(cfg, decode=decode), seed)


def epoch_batches(loaders_, epoch: int) -> list:
    loaders_.train_sampler.set_epoch(epoch)
    return list(loaders_.train)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= MAX_DIFF and diff.float().mean() <= MAX_MEAN_DIFF, (diff.max(), diff.float().mean())


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


# ------------------------------------------------------------------------------------------ same images


def test_a_training_batch_equals_the_pil_pipeline_for_the_same_seed_epoch_and_index(photo_root):
    cfg = data_cfg(photo_root)
    device = loaders(cfg, "device")
    reference = data.SeededDataset(data.ImageFolderDataset(photo_root / "train"), data.build_train_transform(cfg),
                                   seed=7)
    device.train_sampler.set_epoch(3)
    keys = list(device.train_sampler)
    images, labels, bad = next(iter(device.train))
    expected = [reference[key] for key in keys[:len(images)]]
    assert_close(images, torch.stack([image for image, _, _ in expected]))
    assert labels.tolist() == [label for _, label, _ in expected]
    assert not any(bad)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_training_batches_equal_the_workers_loaders_over_epochs(photo_root, interpolation):
    cfg = data_cfg(photo_root, f"data.interpolation={interpolation}")
    workers, device = loaders(cfg, "workers"), loaders(cfg, "device")
    for epoch in (1, 2):
        for (a, labels_a, _), (b, labels_b, _) in zip(epoch_batches(workers, epoch), epoch_batches(device, epoch)):
            assert torch.equal(labels_a, labels_b)
            assert_close(a, b)


def test_validation_batches_equal_the_workers_loaders(photo_root):
    cfg = data_cfg(photo_root)
    workers, device = loaders(cfg, "workers"), loaders(cfg, "device")
    for (a, labels_a, _), (b, labels_b, _) in zip(workers.val, device.val, strict=True):
        assert torch.equal(labels_a, labels_b)
        assert_close(a, b)


def test_worker_processes_hand_over_the_same_batches(photo_root):
    cfg = data_cfg(photo_root)
    in_process = epoch_batches(loaders(cfg, "device"), 2)
    from_workers = epoch_batches(loaders(data_cfg(photo_root, "data.num_workers=2"), "device"), 2)
    for (a, labels_a, _), (b, labels_b, _) in zip(in_process, from_workers, strict=True):
        assert torch.equal(a, b) and torch.equal(labels_a, labels_b)


def test_jpegs_leave_the_workers_encoded(photo_root):
    device = loaders(data_cfg(photo_root), "device")
    batch, _, _ = device.train.loader.collate_fn([device.train.dataset[(0, i)] for i in range(4)])
    assert isinstance(batch, EncodedBatch)
    assert batch.positions == [0, 1, 2, 3] and batch.decoded_positions == []
    assert all(window is not None for window in batch.windows)


# ------------------------------------------------------------------------------------------ EXIF orientation


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29's decoders
@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_turns_the_image_as_pil_does(orientation):
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = jpeg_bytes(photo(orientation, 30, 50), orientation)
    stored = decode_jpeg(torch.frombuffer(bytearray(encoded), dtype=torch.uint8), mode=ImageReadMode.RGB)
    expected = pil_to_tensor(to_rgb(Image.open(io.BytesIO(encoded))))
    assert torch.equal(upright(stored, orientation), expected)
    height, width, found = jpeg_header(encoded)
    assert (height, width, found) == (*expected.shape[1:], orientation)


def test_exif_rotated_jpegs_are_cropped_as_the_workers_crop_them(tmp_path):
    root = write_photo_folder(tmp_path / "rotated", shapes=((120, 200),), orientations=(6, 8, 3, 5))
    cfg = data_cfg(root)
    workers, device = loaders(cfg, "workers"), loaders(cfg, "device")
    for (a, _, _), (b, _, _) in zip(epoch_batches(workers, 1), epoch_batches(device, 1), strict=True):
        assert_close(a, b)
    for (a, _, _), (b, _, _) in zip(workers.val, device.val, strict=True):
        assert_close(a, b)


# ------------------------------------------------------------------------------------------ other files


def test_pngs_and_cmyk_jpegs_are_decoded_in_the_workers_exactly_as_before(tmp_path):
    root = write_photo_folder(tmp_path / "mixed")
    Image.fromarray(photo(5)).save(root / "train" / "a" / "png.png")
    Image.fromarray(photo(6)).save(root / "train" / "b" / "png_named.jpg", "PNG")
    Image.fromarray(photo(7)).convert("CMYK").save(root / "train" / "b" / "cmyk.jpg", "JPEG")
    cfg = data_cfg(root)
    workers, device = loaders(cfg, "workers"), loaders(cfg, "device")
    samples = device.train.dataset.samples
    others = {i for i, (path, _) in enumerate(samples) if Path(path).stem in ("png", "png_named", "cmyk")}
    assert len(others) == 3
    items = [device.train.dataset[(1, i)] for i in range(len(samples))]
    batch, _, _ = device.train.loader.collate_fn(items)
    assert set(batch.decoded_positions) == others  # not sent to the batch decoder
    decoded, _, _ = device.train.collate_fn(items)
    for i in others:  # the same PIL pipeline: bit-identical
        assert torch.equal(decoded[i], workers.train.dataset[(1, i)][0])


# ------------------------------------------------------------------------------------------ unreadable files


@pytest.fixture
def broken_root(tmp_path):
    """photo_root's layout with one JPEG that fails only at batch decoding and one truncated JPEG."""
    root = write_photo_folder(tmp_path / "broken")
    (root / "train" / "a" / "1.jpg").write_bytes(undecodable_jpeg())
    (root / "train" / "b" / "2.jpg").write_bytes(truncated_jpeg())
    return root


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29's decoders
def test_the_broken_files_fail_in_every_decoder(broken_root):
    from torchvision.io import decode_jpeg

    for path in (broken_root / "train" / "a" / "1.jpg", broken_root / "train" / "b" / "2.jpg"):
        with pytest.raises(DataError):
            data.load_image(str(path))
        with pytest.raises(RuntimeError):
            decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))
    # only the truncated one is judged by PIL in the worker; the other reaches the batch decoder
    assert jpeg_header(undecodable_jpeg()) is not None and jpeg_header(truncated_jpeg()) is None


def test_a_jpeg_cut_anywhere_in_its_scans_is_left_to_pil_in_the_worker():
    # libjpeg-turbo fails on a cut file, but nvJPEG may pad it with gray: the worker must not send it on
    encoded = jpeg_bytes(photo(3), quality=75)
    scan = encoded.find(b"\xff\xda")
    assert jpeg_header(encoded) is not None and jpeg_header(encoded + b"\0" * 16) is not None
    assert all(jpeg_header(encoded[:cut]) is None for cut in range(scan, len(encoded) - 1))


@pytest.mark.parametrize("name", ["a/1.jpg", "b/2.jpg"])
def test_with_bad_images_error_a_broken_jpeg_stops_naming_the_file(broken_root, name):
    (broken_root / "train" / ("b/2.jpg" if name == "a/1.jpg" else "a/1.jpg")).unlink()  # only `name` is broken
    device = loaders(data_cfg(broken_root, "data.bad_images=error"), "device")
    with pytest.raises(DataError) as error:
        epoch_batches(device, 0)
    assert str(error.value).startswith(f"cannot read image {broken_root / 'train' / name}: ")


def test_with_bad_images_skip_each_broken_jpeg_is_replaced_and_reported_as_the_workers_do(broken_root):
    cfg = data_cfg(broken_root, "data.bad_images=skip", "data.max_bad_fraction=0.5")
    workers, device = loaders(cfg, "workers"), loaders(cfg, "device")
    broken = {str(broken_root / "train" / "a" / "1.jpg"), str(broken_root / "train" / "b" / "2.jpg")}
    for epoch in (0, 1):
        reported = [path for _, _, bad in epoch_batches(device, epoch) for path in bad if path]
        assert sorted(reported) == sorted(broken)
    # the truncated file is replaced in the worker, exactly as with workers decoding
    truncated = next(i for i, (path, _) in enumerate(device.train.dataset.samples) if path.endswith("b/2.jpg"))
    decoded, _, _ = device.train.collate_fn([device.train.dataset[(0, truncated)]])
    assert_close(decoded[0], workers.train.dataset[(0, truncated)][0])


def test_a_jpeg_that_fails_at_batch_decoding_takes_the_next_image_of_the_batch():
    good = [jpeg_bytes(photo(seed, 60, 80)) for seed in range(3)]
    items = [(EncodedJpeg(encoded, f"img{i}.jpg", 60, 80, window=(0, 0, 60, 80)), i, "")
             for i, encoded in enumerate([good[0], undecodable_jpeg(), good[1], good[2]])]
    batch, labels, bad = collate_encoded(items)
    cfg = data_cfg("unused")
    images, labels, bad = BatchDecoder(cfg, train=True, device="cpu", bad_images="skip")(batch, labels, bad)
    assert bad == ("", "", "", "", "img1.jpg")
    assert labels.tolist() == [0, 2, 2, 3] and torch.equal(images[1], images[2])
    with pytest.raises(DataError, match="cannot read image img1.jpg: "):
        BatchDecoder(cfg, train=True, device="cpu", bad_images="error")(*collate_encoded(items))


def encoded_items(count: int, height: int = 60, width: int = 80) -> list:
    """Dataset items of whole-image training crops of ``count`` photo JPEGs, as the workers leave them."""
    return [(EncodedJpeg(jpeg_bytes(photo(seed, height, width)), f"img{seed}.jpg", height, width,
                         window=(0, 0, height, width)), seed, "") for seed in range(count)]


def test_the_decoder_adds_up_the_host_s_time_in_its_decode_calls_per_batch():
    decoder = BatchDecoder(data_cfg("unused"), train=True, device="cpu", bad_images="skip")
    assert (decoder.waited.batches, decoder.waited.seconds) == (0, 0.0)
    decoder(*collate_encoded(encoded_items(3)))
    assert decoder.waited.batches == 1 and decoder.waited.seconds > 0
    # a batch the workers decoded whole makes no decode call
    after_one = decoder.waited.seconds
    decoder(*collate_encoded([(torch.zeros(3, 60, 80, dtype=torch.uint8), 0, "")]))
    assert (decoder.waited.batches, decoder.waited.seconds) == (1, after_one)
    # a broken JPEG fails the batch call; the calls that find it belong to the same batch
    broken = [(EncodedJpeg(undecodable_jpeg(), "broken.jpg", 64, 64, window=(0, 0, 64, 64)), 9, ""),
              *encoded_items(2)]
    decoder(*collate_encoded(broken))
    assert decoder.waited.batches == 2 and decoder.waited.seconds > after_one


def test_a_training_run_counts_the_skipped_jpegs(broken_root, tmp_path):
    cfg = load_config(None, [*TINY_RUN, f"data.root={broken_root}", f"train.output_dir={tmp_path / 'run'}",
                             "data.decode=device", "data.bad_images=skip", "data.max_bad_fraction=0.5",
                             "data.batch_size=4", "train.epochs=1"])
    row = fit(cfg)
    assert row["bad_images"] == 2


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("setting", ["data.auto_augment=randaugment", "data.random_erasing=0.25"])
def test_augmentations_the_device_does_not_apply_are_refused_in_one_line(cli, photo_root, tmp_path, setting):
    result = cli(*device_train_args(photo_root, tmp_path / "run", setting))
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: data.decode: device does not apply data.")
    assert setting.split("=")[0] in line
    with pytest.raises(ConfigError):
        loaders(data_cfg(photo_root, setting), "device")


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    return write_tinted_jpegs(tmp_path_factory.mktemp("tinted"))


def device_train_args(root, run, *extra):
    """train_args with data.decode=device."""
    return train_args(root, run, "data.decode=device", *extra)


@pytest.fixture(scope="module")
def device_run(jpeg_root, tmp_path_factory):
    from typer.testing import CliRunner

    from mbv2train.cli import app

    run = tmp_path_factory.mktemp("device_run") / "run"
    result = CliRunner().invoke(app, device_train_args(jpeg_root, run))
    return run, result


def test_mbv2_train_with_device_decoding_trains_on_a_jpeg_folder(device_run):
    run, result = device_run
    assert result.exit_code == 0, result.output
    rows = run_metrics(run)
    assert [(row["epoch"], row["step"]) for row in rows] == [(1, 3), (2, 6)]  # 24 images, batches of 8
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"]) for row in rows)
    assert "epoch 2 | train_loss" in result.stdout


def test_tensorboard_sample_images_go_through_the_device_decoder(device_run):
    run, _ = device_run
    assert read_events(run).Tags()["images"] == ["train/augmented_images"]


def test_mbv2_eval_with_device_decoding_reproduces_the_run_s_validation(cli, device_run):
    import json

    run, _ = device_run
    last = run_metrics(run)[-1]
    result = cli("eval", "--ckpt", run / "last.pt", "--json")  # the saved config says data.decode: device
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["images"] == 12
    assert out["top1"] == pytest.approx(last["val_top1"]) and out["loss"] == pytest.approx(last["val_loss"])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_equals_an_uninterrupted_run(jpeg_root, tmp_path):
    whole = tmp_path / "whole"
    fit(load_config(None, [*TINY_RUN, "data.decode=device", *SMALL_STEPS, f"data.root={jpeg_root}",
                           f"train.output_dir={whole}"]))
    run = tmp_path / "killed"
    args = device_train_args(jpeg_root, run, *SMALL_STEPS, "train.checkpoint_every_steps=1")
    step = 8  # of 24: mid-epoch 1
    # The victim hangs after computing `step`, before saving it; the line of the step before says that
    # step's checkpoint is written. The kill lands anywhere in between: mid-step or in the hang.
    victim = start(args + ["--fault", f"stall_at_step={step}"])
    LineReader(victim.stdout).wait_for(progress_line(step - 1))
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert run_ckpt(run)["global_step"] == step - 1
    assert run_metrics(run) == []  # killed before the first epoch ended

    resumed = start(args + ["--resume", "auto"])
    out = LineReader(resumed.stdout)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert f"resuming at epoch 1, step {step - 1}/12" in out.text()
    same_state(run_ckpt(whole), run_ckpt(run))
    rows = metric_rows(run)
    assert rows == metric_rows(whole) and len(rows) == 2


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_cuda_and_cpu_decoding_agree_within_the_decoders_rounding(photo_root):
    """nvJPEG and libjpeg-turbo differ in their IDCT and chroma upsampling: PSNR >= 30 dB, the floor the
    workers' fast path is held to as well."""
    cfg = data_cfg(photo_root, "data.pin_memory=true")
    cpu = data.build_loaders(dataclasses.replace(cfg, decode="device"), 7, device_type="cpu")
    gpu = data.build_loaders(dataclasses.replace(cfg, decode="device"), 7, device_type="cuda")
    for (a, labels_a, _), (b, labels_b, _) in zip(epoch_batches(cpu, 1), epoch_batches(gpu, 1), strict=True):
        assert b.is_cuda and torch.equal(labels_a, labels_b)
        mse = (a.double() - b.cpu().double()).pow(2).mean()
        assert 10 * torch.log10(255 ** 2 / mse.clamp(min=1e-10)) >= 30


# The reproduction of https://github.com/pytorch/vision/pull/9606, through mbv2's decoder: tensors whose reads
# are still queued on the stream are freed (the host runs ahead of the GPU, as in training), then a batch is
# decoded. A decoder that writes into their memory changes what the queued reads see.
FILL = 7
GPU_SLEEP_CYCLES = 10**9  # about half a second of GPU clock: the reads wait behind it while the decode runs


def reads_disturbed_by(decode, shape: tuple[int, ...], count: int) -> int:
    """How many of ``count`` queued reads of freed tensors of ``shape`` saw other values than their fill."""
    fillers = [torch.full(shape, FILL, dtype=torch.uint8, device="cuda") for _ in range(count)]
    torch.cuda.synchronize()  # the fill is in memory
    torch.cuda._sleep(GPU_SLEEP_CYCLES)
    sums = [filler.sum(dtype=torch.int64) for filler in fillers]  # queued behind the sleep
    del fillers  # freed while their reads wait: the caching allocator may hand their memory out again now
    decode()
    torch.cuda.synchronize()
    return sum(int(total) != FILL * math.prod(shape) for total in sums)


def freshly_started(decode) -> None:
    """Run ``decode`` once (nvJPEG's start-up stays out of the reproduction), then empty the allocator's
    cache, so that the only free blocks of the reproduction's sizes are the ones it frees."""
    decode()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_a_batch_decode_never_writes_into_memory_that_queued_kernels_still_read():
    items = encoded_items(8, 256, 320)  # each decoded JPEG has exactly a filler's size: (3, 256, 320)
    decoder = BatchDecoder(data_cfg("unused"), train=True, device="cuda")
    freshly_started(lambda: decoder(*collate_encoded(items)))
    # Once more, so that the decoder's own blocks are cached as in training: a new device allocation during
    # the reproduction would order later work after the queued reads and hide a missing guard.
    decoder(*collate_encoded(items))
    torch.cuda.synchronize()
    assert reads_disturbed_by(lambda: decoder(*collate_encoded(items)), (3, 256, 320), len(items)) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_the_reproduction_catches_torchvision_s_decode_called_on_the_training_stream():
    """The test above proves something only if the reproduction sees the unguarded decode's writes."""
    batch, _, _ = collate_encoded(encoded_items(8, 256, 320))
    freshly_started(lambda: _decode_jpegs(batch.jpegs(), torch.device("cuda")))
    disturbed = reads_disturbed_by(lambda: _decode_jpegs(batch.jpegs(), torch.device("cuda")), (3, 256, 320), 8)
    assert disturbed > 0, "torchvision's CUDA decode left the freed memory alone: has it been fixed upstream?"
