"""Unreadable images (data.bad_images: error | skip) and unusual but valid files that must load."""

import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, features

from helpers import run_metrics, torchrun, train_args, truncated_jpeg, write_images
from mbv2train import data
from mbv2train.config import DataConfig
from mbv2train.data import BadImageLog, SeededDataset
from mbv2train.errors import DataError

CLASSES = ["cat", "dog", "fox"]


def write_bad_files(split_dir: Path) -> list[str]:
    """A truncated JPEG, a zero-byte file and a text file named .jpg, one per class; their paths."""
    bad = [split_dir / "cat" / "broken.jpg", split_dir / "dog" / "empty.jpg", split_dir / "fox" / "notes.jpg"]
    bad[0].write_bytes(truncated_jpeg())
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image\n")
    return sorted(map(str, bad))


@pytest.fixture
def bad_root(tmp_path):
    """train: 6 good PNGs + 1 bad file per class (21 samples); val: 2 good PNGs per class."""
    root = tmp_path / "data"
    for c in CLASSES:
        write_images(root / "train" / c, 6)
        write_images(root / "val" / c, 2)
    return root


@pytest.fixture
def bad_paths(bad_root):
    return write_bad_files(bad_root / "train")


def skip_cfg(root, **changes):
    # batch 7 divides the 21 training samples, so drop_last keeps every sample, the bad ones included.
    cfg = DataConfig(root=str(root), image_size=16, val_resize=16, val_crop=16, batch_size=7, num_workers=0,
                     persistent_workers=False, bad_images="skip", max_bad_fraction=0.2)
    return replace(cfg, **changes)


def run_epoch(loaders, epoch, log=None):
    loaders.train_sampler.set_epoch(epoch)
    images, labels, bad = [], [], []
    for batch_images, batch_labels, batch_bad in loaders.train:
        assert batch_images.shape == (7, 3, 16, 16) and batch_images.dtype == torch.uint8
        assert batch_labels.shape == (7,) and isinstance(batch_bad, (list, tuple)) and len(batch_bad) == 7
        if log is not None:
            log.record(batch_bad)
        images.append(batch_images)
        labels.append(batch_labels)
        bad += list(batch_bad)
    return torch.cat(images), torch.cat(labels), bad


# ---------------------------------------------------------------- skip

@pytest.mark.parametrize("workers", [0, 2])
def test_skip_gives_full_batches_and_reports_each_bad_file_once(bad_root, bad_paths, workers, capsys):
    loaders = data.build_loaders(skip_cfg(bad_root, num_workers=workers), seed=0)
    log = BadImageLog(len(loaders.train.dataset), 0.2, "train")
    for epoch in (0, 1):
        log.start_epoch()
        _, _, bad = run_epoch(loaders, epoch, log)
        assert sorted(p for p in bad if p) == bad_paths
        assert log.epoch_count == 3
    # On a 1-CPU machine (taskset -c 0) the 2-worker loader also warns that it is capped at 1 worker.
    warned = [line for line in capsys.readouterr().err.splitlines() if "CPUs are available" not in line]
    assert sorted(warned) == [f"warning: skipped unreadable image {p}" for p in bad_paths]


def test_skip_substitutes_are_the_same_across_runs_and_worker_counts(bad_root, bad_paths):
    runs = [run_epoch(data.build_loaders(skip_cfg(bad_root, num_workers=w), seed=0), epoch=3) for w in (0, 2, 0)]
    for images, labels, bad in runs[1:]:
        assert torch.equal(images, runs[0][0]) and torch.equal(labels, runs[0][1]) and bad == runs[0][2]


def test_substitute_is_next_readable_sample_augmented_with_the_original_seed(bad_root, bad_paths):
    cfg = skip_cfg(bad_root, hflip=0.5, auto_augment="randaugment")
    folder = data.ImageFolderDataset(bad_root / "train")
    dataset = SeededDataset(folder, data.build_train_transform(cfg), seed=5, bad_images="skip",
                            max_bad_fraction=0.2)
    paths = [p for p, _ in dataset.samples]
    # fox/notes.jpg is the last sample: its search wraps to cat/broken.jpg (bad too), then cat/img0.png.
    for bad, expected in ((bad_paths[0], 1), (bad_paths[2], 1), (bad_paths[1], paths.index(bad_paths[1]) + 1)):
        index = paths.index(bad)
        image, label, reported = dataset[(2, index)]
        assert reported == bad
        # the same sample without the bad file in the way: the substitute at the bad file's index
        fixed = SeededDataset(folder, data.build_train_transform(cfg), seed=5)
        fixed.samples = list(dataset.samples)
        fixed.samples[index] = dataset.samples[expected]
        want_image, want_label, want_bad = fixed[(2, index)]
        assert torch.equal(image, want_image) and label == want_label and want_bad == ""


def test_skip_in_val_substitutes_and_names_the_file(bad_root):
    bad = bad_root / "val" / "dog" / "empty.jpg"
    bad.write_bytes(b"")
    loader, _ = data.build_val_loader(skip_cfg(bad_root), bad_root / "val")
    images, labels, reported = zip(*loader)
    assert torch.cat(images).shape == (7, 3, 16, 16)
    assert [p for batch in reported for p in batch if p] == [str(bad)]


def test_good_samples_report_no_bad_path_in_error_mode(bad_root):
    loader, _ = data.build_val_loader(skip_cfg(bad_root, bad_images="error"), bad_root / "val")
    assert [p for _, _, batch in loader for p in batch] == [""] * 6


# ---------------------------------------------------------------- error

def data_error(run) -> str:
    """The message of the DataError that ``run()`` raises."""
    try:
        run()
    except DataError as e:
        # A worker's error is re-raised in a frame that refers to it, a cycle that keeps the DataLoader
        # iterator alive until a later garbage collection, whose shutdown then waits ~5 s per worker.
        e.__traceback__ = None
        return str(e)
    raise AssertionError("no DataError raised")


@pytest.mark.parametrize("workers", [0, 2])
def test_error_mode_stops_naming_the_file(bad_root, bad_paths, workers):
    loaders = data.build_loaders(skip_cfg(bad_root, bad_images="error", num_workers=workers), seed=0)
    message = data_error(lambda: run_epoch(loaders, 0))
    assert re.fullmatch(r"cannot read image .*/(broken|empty|notes)\.jpg: .+", message), message


@pytest.mark.parametrize("workers", [0, 2])
def test_error_mode_stops_on_a_bad_val_image(bad_root, workers):
    (bad_root / "val" / "fox" / "zz.jpg").write_bytes(truncated_jpeg())
    loader, _ = data.build_val_loader(skip_cfg(bad_root, bad_images="error", num_workers=workers),
                                      bad_root / "val")
    message = data_error(lambda: list(loader))
    assert re.fullmatch(r"cannot read image .*fox/zz\.jpg: image file is truncated .*", message), message


@pytest.mark.parametrize("name, content, reason", [
    ("broken.jpg", truncated_jpeg(), "image file is truncated"),
    ("empty.jpg", b"", "empty file"),
    ("notes.jpg", b"not an image\n", "cannot identify image file"),
])
def test_load_image_names_file_and_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"^cannot read image .*{name}: {reason}"):
        data.load_image(str(tmp_path / name))


# ---------------------------------------------------------------- max_bad_fraction

def test_bad_image_log_raises_past_max_fraction():
    log = BadImageLog(21, 0.1, "train", folder="/data/train")
    log.record(["", "/data/train/a/1.jpg", "/data/train/a/2.jpg", "/data/train/a/1.jpg"])
    assert log.epoch_count == 3 and len(log.seen) == 2  # 2 <= 2.1: still allowed
    with pytest.raises(DataError, match=r"^3 of 21 train images are unreadable, more than "
                                        r"data.max_bad_fraction 0.1; run `mbv2 data check /data/train`$"):
        log.record(["/data/train/b/3.jpg"])


def test_bad_image_log_ignores_empty_strings_and_counts_per_epoch(capsys):
    log = BadImageLog(10, 1.0, "val")
    log.record(["", "", "x.jpg"])
    log.start_epoch()
    log.record(["x.jpg", ""])
    assert log.epoch_count == 1 and capsys.readouterr().err == "warning: skipped unreadable image x.jpg\n"


def test_with_several_processes_the_limit_is_checked_only_where_they_pool_their_files(capsys):
    log = BadImageLog(20, 0.05, "train", folder="/data/train", processes=2)
    log.record(["/data/train/a/1.jpg", "", "/data/train/b/2.jpg"])  # past the limit, but this process alone
    assert log.epoch_count == 2 and capsys.readouterr().err == ""
    with pytest.raises(DataError, match=r"^2 of 20 train images are unreadable, more than data.max_bad_fraction "
                                        r"0.05; run `mbv2 data check /data/train`$"):
        log.share()  # outside torchrun the pool is this process's own files
    assert capsys.readouterr().err.splitlines() == ["warning: skipped unreadable image /data/train/a/1.jpg",
                                                    "warning: skipped unreadable image /data/train/b/2.jpg"]


def test_training_with_too_many_bad_images_stops(bad_root, bad_paths):
    loaders = data.build_loaders(skip_cfg(bad_root, max_bad_fraction=0.1), seed=0)
    log = BadImageLog(len(loaders.train.dataset), 0.1, "train")
    with pytest.raises(DataError, match=r"3 of 21 train images are unreadable"):
        run_epoch(loaders, 0, log)


@pytest.mark.parametrize("bad, fraction, expected", [
    (4, 0.1, "3 of 22 train images are unreadable ({first} and 2 files after it), more than "
             "data.max_bad_fraction 0.1 allows (2)"),  # a0..a3 in a row; the fourth is never reached
    (2, 0.05, "2 of 20 train images are unreadable ({first} and 1 file after it), more than "
              "data.max_bad_fraction 0.05 allows (1)"),
])
def test_a_long_run_of_bad_files_stops_the_worker_naming_the_file(bad_root, bad, fraction, expected):
    for i in range(bad):
        (bad_root / "train" / "cat" / f"a{i}.jpg").write_bytes(b"")
    folder = data.ImageFolderDataset(bad_root / "train")
    dataset = SeededDataset(folder, data.build_train_transform(skip_cfg(bad_root)), 0, bad_images="skip",
                            max_bad_fraction=fraction)
    with pytest.raises(DataError) as stopped:
        dataset[(0, 0)]
    first = bad_root / "train" / "cat" / "a0.jpg"
    assert str(stopped.value) == (expected.format(first=first) + f"; run `mbv2 data check {bad_root / 'train'}`")


def test_every_file_unreadable_is_an_error(tmp_path):
    for c in CLASSES:
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.jpg").write_bytes(b"")
    folder = data.ImageFolderDataset(tmp_path)
    dataset = SeededDataset(folder, data.build_val_transform(DataConfig()), 0, bad_images="skip",
                            max_bad_fraction=1.0)
    with pytest.raises(DataError, match=r"none of the 3 train images in .* can be read"):
        dataset[(0, 1)]


# ---------------------------------------------------------------- unusual but valid files

def save(img: Image.Image, path: Path, fmt: str | None = None, **options) -> str:
    img.save(path, fmt, **options)
    return str(path)


def gradient(mode="RGB", size=(32, 24)) -> Image.Image:
    img = Image.new("RGB", size)
    img.putdata([(x * 8, y * 10, 100) for y in range(size[1]) for x in range(size[0])])
    return img.convert(mode)


def palette_png(path: Path, transparency: bool) -> str:
    img = Image.new("P", (10, 6), 1)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    img.paste(0, (0, 0, 5, 6))
    # Transparency as bytes (alpha per palette entry: 0 clear, 0x80 half) is the kind PIL warns about.
    return save(img, path, transparency=b"\x00\x80") if transparency else save(img, path)


def close(pixel, expected, tol):
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


def test_grayscale_loads_as_equal_rgb_channels(tmp_path):
    image = data.load_image(save(Image.new("L", (8, 6), 77), tmp_path / "gray.png"))
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((3, 3)) == (77, 77, 77)


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    image = data.load_image(save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"))
    assert image.mode == "RGB" and image.size == (16, 16) and close(image.getpixel((8, 8)), (255, 0, 0), 40)


def test_rgba_png_drops_alpha(tmp_path):
    image = data.load_image(save(Image.new("RGBA", (8, 6), (10, 200, 30, 128)), tmp_path / "alpha.png"))
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((1, 1)) == (10, 200, 30)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_png_loads_its_colours_without_warnings(tmp_path, transparency):
    path = palette_png(tmp_path / "palette.png", transparency)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on P -> RGB when the palette has transparency
        image = data.load_image(path)
    assert image.mode == "RGB" and image.size == (10, 6)
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((9, 5)) == (200, 10, 10)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    img = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 128 * 257, 65535)):
        img.putpixel((x, 0), value)
    path = save(img, tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really 16-bit on disk
    image = data.load_image(path)
    assert image.mode == "RGB" and image.size == (3, 1)
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_png_named_jpg_loads_by_content(tmp_path):
    original = gradient()
    image = data.load_image(save(original, tmp_path / "really_png.jpg", "PNG"))
    assert image.size == original.size and image.tobytes() == original.tobytes()


@pytest.mark.skipif(not features.check("webp"), reason="this PIL has no WebP support")
def test_webp_named_jpg_loads_by_content(tmp_path):
    original = gradient()
    image = data.load_image(save(original, tmp_path / "really_webp.jpg", "WEBP", lossless=True))
    assert image.size == original.size and image.tobytes() == original.tobytes()


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left edge ends up on top
    image = data.load_image(save(img, tmp_path / "phone.jpg", exif=exif))
    assert image.size == (20, 40)
    assert close(image.getpixel((10, 5)), (255, 0, 0), 40) and close(image.getpixel((10, 34)), (0, 0, 255), 40)


def test_unusual_files_never_count_as_bad(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    save(Image.new("L", (8, 8), 9), folder / "gray.png")
    save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), folder / "cmyk.jpg")
    save(Image.new("RGBA", (8, 8), (1, 2, 3, 0)), folder / "alpha.png")
    palette_png(folder / "palette.png", transparency=False)
    palette_png(folder / "palette_t.png", transparency=True)
    save(Image.new("I;16", (8, 8), 30000), folder / "deep.png")
    save(gradient(), folder / "png.jpg", "PNG")
    if features.check("webp"):
        save(gradient(), folder / "webp.jpg", "WEBP")
    dataset = SeededDataset(data.ImageFolderDataset(tmp_path), data.build_val_transform(
        DataConfig(val_resize=8, val_crop=8)), seed=0, bad_images="skip", max_bad_fraction=0.0)
    items = [dataset[(0, i)] for i in range(len(dataset))]
    assert all(bad == "" and image.shape == (3, 8, 8) for image, _, bad in items)


# ---------------------------------------------------------------- through `mbv2 train`

# a run of 16 px images in batches of 7, without TINY_RUN's augmentation and learning rate settings
BAD_RUN = ["model.width_mult=0.25", "data.image_size=16", "data.val_resize=16", "data.val_crop=16",
           "data.batch_size=7", "data.num_workers=0", "train.epochs=2", "train.tb_images=0"]


def train_command(root, run, *extra):
    return train_args(root, run, *extra, base=BAD_RUN)


def test_mbv2_train_with_skip_counts_the_three_bad_files_every_epoch(cli, bad_root, bad_paths, tmp_path):

    result = cli(*train_command(bad_root, tmp_path / "run", "data.bad_images=skip", "data.max_bad_fraction=0.2"))
    assert result.exit_code == 0, result.output
    rows = run_metrics(tmp_path / "run")
    assert [r["bad_images"] for r in rows] == [3, 3]
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped unreadable image")]
    assert sorted(line.rsplit(" ", 1)[1] for line in warned) == bad_paths  # once each, over both epochs


def test_mbv2_train_with_error_stops_with_one_line_naming_a_bad_file(cli, bad_root, bad_paths, tmp_path):
    result = cli(*train_command(bad_root, tmp_path / "run"))
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read image ")
    assert any(path in lines[0] for path in bad_paths)


# ---------------------------------------------------------------- under torchrun

def twenty_train_images(root: Path) -> list[Path]:
    """train: 6 good PNGs per class plus cat/broken.jpg and dog/empty.jpg (2 of 20 unreadable, 10%, and far
    apart in the folder order); val: 2 good PNGs per class. Returns the two bad paths."""
    for c in CLASSES:
        write_images(root / "train" / c, 6)
        write_images(root / "val" / c, 2)
    bad = [root / "train" / "cat" / "broken.jpg", root / "train" / "dog" / "empty.jpg"]
    bad[0].write_bytes(truncated_jpeg())
    bad[1].write_bytes(b"")
    return bad


@pytest.mark.slow
def test_torchrun_counts_bad_images_over_all_processes_and_every_process_stops_on_one_line(tmp_path):
    root = tmp_path / "data"
    twenty_train_images(root)
    # 2 processes x batches of 5: in epoch 1 each process reads 10 images and one of the two bad ones
    result = torchrun(train_command(root, tmp_path / "run", "data.batch_size=5", "data.bad_images=skip",
                                    "data.max_bad_fraction=0.05", "train.epochs=1"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: 2 of 20 training images are unreadable, more than data.max_bad_fraction 0.05; "
                      f"run `mbv2 data check {root / 'train'}`"], result.stderr[-3000:]
    assert result.returncode != 0


@pytest.mark.slow
def test_torchrun_warns_about_and_counts_the_bad_images_every_process_meets(tmp_path):
    root = tmp_path / "data"
    bad = twenty_train_images(root)
    bad.append(root / "val" / "cat" / "img0z.jpg")  # validation image 1 in folder order: rank 1's shard alone
    bad[-1].write_text("not an image\n")
    result = torchrun(train_command(root, tmp_path / "run", "data.batch_size=5", "data.bad_images=skip",
                                    "data.max_bad_fraction=0.2"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = run_metrics(tmp_path / "run")
    assert [(r["bad_images"], r["val_bad_images"]) for r in rows] == [(2, 1), (2, 1)]
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped unreadable image")]
    assert sorted(warned) == sorted(f"warning: skipped unreadable image {path}" for path in bad)  # once each
