"""The fast CPU path (data.decode: workers): JPEGs decoded by libjpeg-turbo and cropped on the uint8 tensor
crop the PIL pipeline's windows and match its pixels; whatever PIL must judge still goes to PIL.

Tolerances: the decoders agree exactly here (PIL and torchvision both run libjpeg-turbo with the same IDCT
and upsampling: EXIF-rotated and grayscale JPEGs measured 0 levels apart), so equality is asserted to
within 1 level to allow another libjpeg-turbo build. After the crop, torch's and PIL's resizers differ by
resampling rounding only: PSNR 54 dB or more on noise with the same window (a window 1 pixel off gives
at most 30 dB), and 30 dB is the floor asserted on real photos (measured on scikit-learn's: 54 dB or more
for training crops, 72 dB or more for validation, bilinear and bicubic alike).
"""

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mbv2train import data
from mbv2train.config import DataConfig
from mbv2train.data import decode, transforms
from mbv2train.data.folders import load_image
from mbv2train.data.loaders import SeededDataset
from mbv2train.errors import DataError

PSNR_FLOOR = 30.0


def reseed(seed: int) -> None:
    # The CPU generator alone, as SeededDataset seeds it: torch.manual_seed also queues CUDA seeding,
    # which records a stack trace each time and made these loops 3x slower.
    torch.default_generator.manual_seed(seed)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def save_jpeg(image: Image.Image, path, **options) -> str:
    image.save(path, "JPEG", **{"quality": 90, **options})
    return str(path)


@pytest.fixture(scope="module")
def sample_photos():
    """scikit-learn's two sample photos (427x640) as PIL images."""
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(pixels) for pixels in load_sample_images().images]


@pytest.fixture(scope="module")
def photo_folder(sample_photos, tmp_path_factory):
    """An ImageFolder of real-photo JPEGs (quality 90): both sample photos whole, and crops of them the
    size of ImageNet's (500x375, 375x500, 333x500 upscaled from 250x375, 375x280)."""
    root = tmp_path_factory.mktemp("photos")
    for c, photo in enumerate(sample_photos):
        folder = root / f"class{c}"
        folder.mkdir()
        save_jpeg(photo, folder / "whole.jpg")
        save_jpeg(photo.crop((40, 20, 540, 395)), folder / "landscape.jpg")
        save_jpeg(photo.crop((200, 0, 480, 375)).resize((375, 500), Image.Resampling.BICUBIC), folder / "portrait.jpg")
        save_jpeg(photo.crop((300, 30, 550, 405)).resize((333, 500), Image.Resampling.BICUBIC), folder / "tall.jpg")
        save_jpeg(photo.crop((10, 100, 385, 380)), folder / "small.jpg")
    return root


def gradient_photo(sample_photos, size=(61, 47)) -> Image.Image:
    """A small, non-square crop of a real photo: a wrong turn or mirror of it cannot go unnoticed."""
    return sample_photos[0].crop((200, 150, 200 + size[0], 150 + size[1]))


def as_tensor(image) -> torch.Tensor:
    return image if isinstance(image, torch.Tensor) else F.pil_to_tensor(image)


# ---------------------------------------------------------------- the crop window

MIRROR_MARKER = torch.tensor([[[0, 1]]], dtype=torch.uint8)  # changes when mirrored


def torchvision_draw(crop: v2.RandomResizedCrop, hflip: float, height: int, width: int):
    """(top, left, height, width, flip) as torchvision's own transforms draw them."""
    shape_only = torch.empty((1, 1, 1), dtype=torch.uint8).expand(3, height, width)
    make_params = getattr(crop, "make_params", None) or crop._get_params  # renamed in torchvision 0.21
    box = make_params([shape_only])
    flip = False
    if hflip > 0:
        flip = not torch.equal(v2.RandomHorizontalFlip(hflip)(MIRROR_MARKER), MIRROR_MARKER)
    return box["top"], box["left"], box["height"], box["width"], flip


@pytest.mark.parametrize("scale, ratio, hflip", [
    ((0.08, 1.0), (3 / 4, 4 / 3), 0.5),  # ImageNet's
    ((0.5, 1.0), (0.5, 2.0), 0.3),  # wider ratios, another flip probability
    ((0.9, 1.0), (1.0, 1.0), 0.0),  # square only: many tries fail, and no flip draw at all
])
def test_crop_draw_equals_torchvision_random_resized_crop(scale, ratio, hflip):
    cfg = DataConfig(image_size=224, scale=scale, ratio=ratio, hflip=hflip)
    drawer = transforms.CropDrawer(cfg)
    crop = v2.RandomResizedCrop(224, scale=scale, ratio=ratio)
    # ImageNet-like sizes, tiny ones, and extreme shapes that force the centred fallback
    for height, width in ((375, 500), (500, 333), (224, 224), (32, 7), (7, 32), (1, 1), (2000, 40), (90, 1000)):
        for seed in range(100):
            reseed(seed)
            ours = drawer(height, width)
            after_ours = torch.get_rng_state()
            reseed(seed)
            theirs = torchvision_draw(crop, hflip, height, width)
            assert (ours.top, ours.left, ours.height, ours.width, ours.flip) == theirs, (height, width, seed)
            # the same number of draws too, so a policy or RandomErasing after the crop draws the same
            assert torch.equal(after_ours, torch.get_rng_state()), (height, width, seed)


def test_draw_train_crop_is_the_drawer_of_the_config():
    cfg = DataConfig(scale=(0.3, 0.6), ratio=(0.5, 0.8))
    reseed(4)
    expected = transforms.CropDrawer(cfg)(300, 400)
    reseed(4)
    assert transforms.draw_train_crop(300, 400, cfg) == expected


def test_fast_path_crops_the_window_the_pil_pipeline_crops(tmp_path):
    # Noise: a window one pixel off gives at most ~30 dB here, the same window 55 dB or more.
    pixels = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    path = save_jpeg(Image.fromarray(pixels), tmp_path / "noise.jpg", quality=95)
    cfg = DataConfig(image_size=32, hflip=0.5)
    fast, pil = transforms.TrainTransform(cfg), transforms.build_train_transform(cfg)
    decoded, pil_image = decode.load_image_fast(path), load_image(path)
    assert isinstance(decoded, torch.Tensor)
    for seed in range(60):
        reseed(seed)
        ours = fast(decoded)
        reseed(seed)
        assert psnr(ours, pil(pil_image)) >= 45, seed


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_train_resize_gives_torchvisions_values(sample_photos, interpolation):
    image = F.pil_to_tensor(sample_photos[1]).permute(1, 2, 0).contiguous().permute(2, 0, 1)  # as decoded
    transform_cfg = DataConfig(image_size=96, interpolation=interpolation)
    transform = transforms.TrainTransform(transform_cfg)
    for top, left, height, width in ((0, 0, 427, 640), (13, 250, 200, 150), (100, 20, 60, 90)):
        window = image[:, top:top + height, left:left + width]
        expected = F.resize(window, [96, 96], interpolation=transforms.tensor_interpolation(transform_cfg),
                            antialias=True)
        assert torch.equal(transform.resize(window), expected), (top, left)


@pytest.mark.parametrize("train", [True, False])
def test_nearest_picks_the_pixels_pil_picks(tmp_path, sample_photos, train):
    # torch's NEAREST rounds source positions down; PIL (and NEAREST_EXACT) takes the nearest centre.
    path = save_jpeg(sample_photos[0].crop((0, 0, 200, 150)), tmp_path / "a.jpg")
    cfg = DataConfig(image_size=40, val_resize=48, val_crop=40, interpolation="nearest")
    fast, pil = ((transforms.TrainTransform(cfg), transforms.build_train_transform(cfg)) if train else
                 (transforms.ValTransform(cfg), transforms.build_val_transform(cfg)))
    decoded, pil_image = decode.load_image_fast(path), load_image(path)
    for seed in range(10):
        reseed(seed)
        ours = fast(decoded)
        reseed(seed)
        # Ties (a position exactly between two source pixels) can still round apart: a few percent of the
        # pixels at most, where NEAREST differs in about two thirds of them.
        assert (ours != pil(pil_image)).float().mean() <= 0.1, seed


def test_policy_and_erasing_draw_as_the_pil_pipeline(tmp_path, sample_photos):
    path = save_jpeg(sample_photos[0].crop((0, 0, 160, 120)), tmp_path / "a.jpg")
    cfg = DataConfig(image_size=64, auto_augment="randaugment", random_erasing=0.5)
    fast, pil = transforms.TrainTransform(cfg), transforms.build_train_transform(cfg)
    decoded, pil_image = decode.load_image_fast(path), load_image(path)
    assert len(fast.after_crop) == 2
    for seed in range(20):
        reseed(seed)
        fast(decoded)
        after_fast = torch.get_rng_state()
        reseed(seed)
        pil(pil_image)
        assert torch.equal(after_fast, torch.get_rng_state()), seed


# ---------------------------------------------------------------- quality on real photos

@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_and_val_samples_stay_above_the_psnr_floor(photo_folder, interpolation):
    cfg = DataConfig(interpolation=interpolation)
    folder = data.ImageFolderDataset(photo_folder)
    pairs = [(SeededDataset(folder, transforms.TrainTransform(cfg), 3, loader=decode.load_image_fast),
              SeededDataset(folder, transforms.build_train_transform(cfg), 3)),
             (SeededDataset(folder, transforms.ValTransform(cfg), 0, loader=decode.load_image_fast),
              SeededDataset(folder, transforms.build_val_transform(cfg), 0))]
    for (fast, pil), epochs in zip(pairs, (3, 1)):  # validation draws nothing: one epoch is all of it
        for index in range(len(folder)):
            for epoch in range(epochs):
                ours, expected = fast[(epoch, index)][0], pil[(epoch, index)][0]
                assert ours.shape == expected.shape == (3, 224, 224) and ours.dtype == torch.uint8
                assert psnr(ours, expected) >= PSNR_FLOOR, (folder.samples[index][0], epoch)


# ---------------------------------------------------------------- unusual JPEGs decode as PIL decodes them

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_oriented_jpeg_decodes_upright_as_pil(tmp_path, sample_photos, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save_jpeg(gradient_photo(sample_photos), tmp_path / "phone.jpg", exif=exif)
    decoded, expected = decode.load_image_fast(path), F.pil_to_tensor(load_image(path))
    assert isinstance(decoded, torch.Tensor) and decoded.shape == expected.shape
    assert (decoded.int() - expected.int()).abs().max() <= 1


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_colour_jpeg_decodes_as_pil(tmp_path, sample_photos, subsampling):
    path = save_jpeg(gradient_photo(sample_photos), tmp_path / "c.jpg", subsampling=subsampling)
    decoded, expected = decode.load_image_fast(path), F.pil_to_tensor(load_image(path))
    assert isinstance(decoded, torch.Tensor) and (decoded.int() - expected.int()).abs().max() <= 1


def test_grayscale_jpeg_decodes_to_pils_rgb(tmp_path, sample_photos):
    path = save_jpeg(gradient_photo(sample_photos).convert("L"), tmp_path / "gray.jpg")
    decoded, expected = decode.load_image_fast(path), F.pil_to_tensor(load_image(path))
    assert isinstance(decoded, torch.Tensor) and decoded.shape == (3, 47, 61)
    assert (decoded.int() - expected.int()).abs().max() <= 1


def without_adobe_marker(jpeg: bytes) -> bytes:
    """The JPEG without its APP14 "Adobe" segment: PIL then reads the CMYK values as not inverted."""
    start = jpeg.index(b"\xff\xee")
    length = int.from_bytes(jpeg[start + 2:start + 4], "big")
    return jpeg[:start] + jpeg[start + 2 + length:]


@pytest.mark.parametrize("adobe_marker", [True, False])
def test_cmyk_jpeg_goes_to_pil(tmp_path, sample_photos, adobe_marker):
    buffer = io.BytesIO()
    gradient_photo(sample_photos).convert("CMYK").save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue() if adobe_marker else without_adobe_marker(buffer.getvalue())
    path = tmp_path / "print.jpg"
    path.write_bytes(jpeg)
    assert decode.jpeg_components(jpeg) == 4
    loaded = decode.load_image_fast(str(path))
    assert isinstance(loaded, Image.Image) and loaded.tobytes() == load_image(str(path)).tobytes()


@pytest.mark.parametrize("name", ["img.png", "png_named.jpg"])
def test_non_jpeg_keeps_the_pil_pipeline(tmp_path, sample_photos, name):
    path = str(tmp_path / name)
    gradient_photo(sample_photos, (90, 70)).save(path, "PNG")
    loaded = decode.load_image_fast(path)
    assert isinstance(loaded, Image.Image)
    cfg = DataConfig(image_size=32)
    reseed(1)
    ours = transforms.TrainTransform(cfg)(loaded)
    reseed(1)
    assert torch.equal(ours, transforms.build_train_transform(cfg)(load_image(path)))


def test_jpeg_components_reads_the_frame_header(tmp_path, sample_photos):
    image = gradient_photo(sample_photos)
    jpegs = {}
    for mode in ("L", "RGB"):
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, "JPEG", exif=Image.Exif().tobytes())  # an APP1 block before it
        jpegs[mode] = buffer.getvalue()
    assert decode.jpeg_components(jpegs["L"]) == 1 and decode.jpeg_components(jpegs["RGB"]) == 3
    assert decode.jpeg_components(jpegs["RGB"][:30]) is None  # cut before the frame header
    assert not decode.is_jpeg(b"\x89PNG\r\n\x1a\n") and decode.is_jpeg(jpegs["L"])


# ---------------------------------------------------------------- unreadable files stay unreadable

def data_error(load, path) -> str:
    with pytest.raises(DataError) as error:
        load(str(path))
    return str(error.value)


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_is_unreadable_wherever_it_is_cut(tmp_path, sample_photos, progressive):
    buffer = io.BytesIO()
    sample_photos[1].crop((0, 0, 200, 150)).save(buffer, "JPEG", quality=90, progressive=progressive)
    jpeg = buffer.getvalue()
    path = tmp_path / "cut.jpg"
    for cut in (len(jpeg) // 10, len(jpeg) // 2, len(jpeg) - 100, len(jpeg) - 2, len(jpeg) - 1):
        path.write_bytes(jpeg[:cut])
        # the PIL loader's verdict and reason ("image file is truncated", or for a cut header "Truncated
        # File Read"), so that data.bad_images and `mbv2 data check` see what they saw before
        assert data_error(decode.load_image_fast, path) == data_error(load_image, path), cut


def test_missing_file_reads_as_the_pil_loader_reports_it(tmp_path):
    missing = tmp_path / "gone.jpg"
    assert data_error(decode.load_image_fast, missing) == data_error(load_image, missing)
    assert data_error(decode.load_image_fast, missing).startswith(f"cannot read image {missing}: [Errno 2] No such")


# ---------------------------------------------------------------- exactness through the loaders

@pytest.fixture
def jpeg_root(tmp_path, sample_photos):
    """train: 4 JPEGs per class (two of them EXIF-rotated); val: 2 per class."""
    root = tmp_path / "data"
    for c, name in enumerate(("cat", "dog")):
        for split, count in (("train", 4), ("val", 2)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                exif = Image.Exif()
                exif[0x0112] = 6 if i % 2 else 1
                crop = sample_photos[c].crop((i * 40, i * 30, i * 40 + 120, i * 30 + 90))
                save_jpeg(crop, folder / f"{i}.jpg", exif=exif)
    return root


def jpeg_cfg(root, **changes) -> DataConfig:
    cfg = DataConfig(root=str(root), image_size=32, val_resize=36, val_crop=32, batch_size=4, num_workers=0,
                     persistent_workers=False, auto_augment="trivialaugment", random_erasing=0.5)
    return dataclasses.replace(cfg, **changes)


def train_epoch(cfg, epoch=2, seed=7):
    loaders = data.build_loaders(cfg, seed=seed)
    loaders.train_sampler.set_epoch(epoch)
    images, labels, _ = zip(*loaders.train)
    return torch.cat(images), torch.cat(labels)


def test_jpeg_samples_depend_only_on_seed_epoch_and_index(jpeg_root):
    dataset = data.build_loaders(jpeg_cfg(jpeg_root), seed=7).train.dataset
    reseed(1)  # the global state before the call must not matter, nor be changed by it
    first = dataset[(3, 5)][0]
    state = torch.get_rng_state()
    reseed(2)
    assert torch.equal(first, dataset[(3, 5)][0]) and not torch.equal(first, dataset[(4, 5)][0])
    reseed(1)
    dataset[(3, 5)]
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow  # worker processes
def test_jpeg_batches_are_the_same_with_zero_and_two_workers(jpeg_root):
    images, labels = train_epoch(jpeg_cfg(jpeg_root))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    with_workers = train_epoch(jpeg_cfg(jpeg_root, num_workers=2))
    assert torch.equal(images, with_workers[0]) and torch.equal(labels, with_workers[1])


def test_batches_come_out_channels_last_with_default_collates_values(jpeg_root):
    from torch.utils.data import default_collate

    cfg = jpeg_cfg(jpeg_root, auto_augment="none", random_erasing=0.0)
    loaders = data.build_loaders(cfg, seed=7)
    loaders.train_sampler.set_epoch(0)
    images, labels, bad = next(iter(loaders.train))
    assert images.is_contiguous(memory_format=torch.channels_last) and images.dtype == torch.uint8
    items = [loaders.train.dataset[key] for key in list(loaders.train_sampler)[:4]]
    expected = default_collate(items)
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1]) and list(bad) == list(expected[2])


