import random
from dataclasses import replace

import pytest
import torch
from PIL import Image

from helpers import write_dataset, write_images
from mbv2train import data
from mbv2train.config import DataConfig
from mbv2train.data import EpochSampler, SeededDataset
from mbv2train.data.demo import write_demo_dataset
from mbv2train.errors import DataError

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture
def root(tmp_path):
    """tmp_path/data/{train,val}/{cat,dog,fox}: 6 train and 2 val images of 20x24 per class."""
    return write_dataset(tmp_path / "data", CLASSES, 6, 2)


@pytest.fixture
def cfg(root):
    return DataConfig(root=str(root), image_size=16, val_resize=18, val_crop=16, batch_size=4,
                      num_workers=0, hflip=0.5, auto_augment="randaugment", random_erasing=0.5)


def dataset_for(cfg, seed=0):
    train_dir, _ = data.resolve_dirs(cfg)
    return SeededDataset(data.ImageFolderDataset(train_dir), data.build_train_transform(cfg), seed)


def one_epoch(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    images, labels, _ = zip(*loader)
    return torch.cat(images), torch.cat(labels)


# ---------------------------------------------------------------- folders and errors

def test_resolve_dirs_joins_root_with_split_names(cfg, root):
    assert data.resolve_dirs(cfg) == (root / "train", root / "val")


def test_resolve_dirs_prefers_explicit_train_and_val_dirs(cfg, root):
    cfg = replace(cfg, root=None, train_dir=str(root / "val"), val_dir=str(root / "train"))
    assert data.resolve_dirs(cfg) == (root / "val", root / "train")


def test_nothing_set_asks_for_data_root():
    with pytest.raises(DataError, match=r"no training data: set data.root or --data DIR"):
        data.resolve_dirs(DataConfig())


def test_missing_root_names_folder_and_key(tmp_path):
    with pytest.raises(DataError, match=r"data.root: folder .*nowhere does not exist"):
        data.resolve_dirs(DataConfig(root=str(tmp_path / "nowhere")))


def test_missing_split_names_folder_and_keys(cfg, root):
    with pytest.raises(DataError, match=r"validation folder .*valid does not exist .*data.val_split"):
        data.resolve_dirs(replace(cfg, val_split="valid"))


def test_split_without_class_folders_is_an_error(cfg, root):
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no class subfolders"):
        data.resolve_dirs(replace(cfg, val_split="empty"))


def test_flat_val_folder_points_to_prepare_script(cfg, root):
    write_images(root / "flat", 3, ext=".JPEG")
    with pytest.raises(DataError, match=r"holds 3 images but no class folders.*prepare_imagenet_val.py") as e:
        data.resolve_dirs(replace(cfg, val_split="flat"))
    assert "\n" not in str(e.value)


def test_find_classes_is_sorted_and_skips_hidden_folders(root):
    (root / "train" / ".ipynb_checkpoints").mkdir()
    assert data.find_classes(root / "train") == CLASSES


def test_class_folder_without_images_is_named(root):
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*emu has no images"):
        data.find_classes(root / "train")


def test_image_folder_names_class_folder_without_images(root):
    (root / "train" / "emu").mkdir()
    with pytest.raises(DataError, match=r"class folder .*emu has no images"):
        data.ImageFolderDataset(root / "train")


def test_upper_case_extensions_are_images(root):
    write_images(root / "train" / "cat", 2, start=100, ext=".JPG")
    assert len(data.ImageFolderDataset(root / "train")) == 6 * 3 + 2


def test_class_mismatch_names_differing_classes(cfg, root):
    write_images(root / "val" / "owl", 2)
    with pytest.raises(DataError, match=r"only in val: owl"):
        data.build_loaders(cfg, seed=0)


def test_fewer_images_than_one_batch_is_an_error(cfg):
    with pytest.raises(DataError, match=r"has 18 images, fewer than one batch \(data.batch_size 32 x 1"):
        data.build_loaders(replace(cfg, batch_size=32), seed=0)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert data.load_image(str(path)).size == (20, 40)


def test_grayscale_images_load_as_rgb(tmp_path):
    Image.new("L", (8, 8), 7).save(tmp_path / "gray.png")
    assert data.load_image(str(tmp_path / "gray.png")).mode == "RGB"


# ---------------------------------------------------------------- loaders and augmentation

def test_train_loader_gives_uint8_batches_of_crop_size(cfg):
    loaders = data.build_loaders(cfg, seed=0)
    images, labels = one_epoch(loaders.train, loaders.train_sampler, 0)
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 16, 16)  # 18 images, drop_last
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    assert loaders.classes == CLASSES and len(loaders.train) == 4


def test_val_loader_gives_every_image_once_as_uint8(cfg):
    loaders = data.build_loaders(replace(cfg, val_batch_size=4), seed=0)
    images, labels, _ = zip(*loaders.val)
    assert [len(x) for x in images] == [4, 2]
    assert torch.cat(images).dtype == torch.uint8 and torch.cat(images).shape == (6, 3, 16, 16)
    assert torch.cat(labels).tolist() == [0, 0, 1, 1, 2, 2]


def test_augmentation_is_identical_with_zero_and_two_workers(cfg):
    batches = []
    for workers in (0, 2):
        loaders = data.build_loaders(replace(cfg, num_workers=workers, persistent_workers=False), seed=3)
        batches.append(one_epoch(loaders.train, loaders.train_sampler, epoch=5))
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])


def test_same_seed_epoch_index_gives_identical_sample(cfg):
    dataset = dataset_for(cfg)
    torch.manual_seed(123)  # the global state before the call must not matter
    first = dataset[(2, 5)][0]
    torch.manual_seed(456)
    assert torch.equal(first, dataset[(2, 5)][0])


def test_different_epochs_give_different_augmentation(cfg):
    dataset = dataset_for(cfg)
    assert not torch.equal(dataset[(0, 5)][0], dataset[(1, 5)][0])


def test_different_seeds_give_different_augmentation(cfg):
    assert not torch.equal(dataset_for(cfg, seed=0)[(0, 5)][0], dataset_for(cfg, seed=1)[(0, 5)][0])


def test_loading_a_sample_leaves_global_rngs_untouched(cfg):
    dataset = dataset_for(cfg)
    torch.manual_seed(7)
    random.seed(7)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    dataset[(0, 0)]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_val_transform_is_deterministic(cfg, root):
    transform = data.build_val_transform(cfg)
    image = data.load_image(str(root / "val" / "cat" / "img0.png"))
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert first.shape == (3, 16, 16) and first.dtype == torch.uint8 and torch.equal(first, transform(image))


def test_train_transform_without_augmentation_is_a_resized_crop(cfg, root):
    cfg = replace(cfg, hflip=0.0, auto_augment="none", random_erasing=0.0)
    names = [type(t).__name__ for t in data.build_train_transform(cfg).transforms]
    assert names == ["RandomResizedCrop", "PILToTensor"]


@pytest.fixture
def plain_cfg(cfg):
    """cfg without random augmentation beyond the crop itself."""
    return replace(cfg, hflip=0.0, auto_augment="none", random_erasing=0.0)


def first_samples(cfg):
    """(train sample 0 of epoch 0, val sample 0) as uint8 tensors, through build_loaders."""
    loaders = data.build_loaders(cfg, seed=0)
    return loaders.train.dataset[(0, 0)][0], loaders.val.dataset[(0, 0)][0]


def test_interpolation_reaches_the_val_resize(plain_cfg, root):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    image = data.load_image(str(root / "val" / "cat" / "img0.png"))
    for mode in ("bilinear", "bicubic", "nearest"):
        resized = F.resize(image, 18, interpolation=InterpolationMode[mode.upper()], antialias=True)
        expected = F.center_crop(F.pil_to_tensor(resized), 16)
        assert torch.equal(first_samples(replace(plain_cfg, interpolation=mode))[1], expected), mode


def test_interpolation_changes_the_train_crop(plain_cfg, root):
    from torchvision.transforms.v2 import functional as F

    train = {mode: first_samples(replace(plain_cfg, interpolation=mode))[0] for mode in ("bilinear", "bicubic",
                                                                                          "nearest")}
    assert not torch.equal(train["bilinear"], train["bicubic"])
    # Nearest only copies pixels of the source, while bilinear blends neighbours into new colours: the same
    # crop window (same seed) tells which filter ran.
    source = data.ImageFolderDataset(root / "train").samples[0][0]
    colours = set(pixels(F.pil_to_tensor(data.load_image(source))))
    assert set(pixels(train["nearest"])) <= colours and not set(pixels(train["bilinear"])) <= colours


def pixels(image: torch.Tensor) -> list[tuple[int, ...]]:
    """The (R, G, B) of every pixel of a (3, H, W) image."""
    return [tuple(c) for c in image.flatten(1).T.tolist()]


@pytest.mark.parametrize("prefetch_factor, pin_memory", [(3, True), (5, False)])
def test_loaders_carry_prefetch_factor_and_pin_memory(cfg, prefetch_factor, pin_memory):
    cfg = replace(cfg, num_workers=1, prefetch_factor=prefetch_factor, pin_memory=pin_memory)
    loaders = data.build_loaders(cfg, seed=0, device_type="cuda")  # built, never iterated: no GPU needed
    for loader in (loaders.train, loaders.val):
        assert loader.num_workers == 1
        assert loader.prefetch_factor == prefetch_factor and loader.pin_memory is pin_memory


def test_pin_memory_is_off_on_the_cpu(cfg):
    loaders = data.build_loaders(replace(cfg, pin_memory=True), seed=0, device_type="cpu")
    assert loaders.train.pin_memory is False and loaders.val.pin_memory is False


# ---------------------------------------------------------------- sampler

def indices(sampler, epoch=0, start=0):
    sampler.set_epoch(epoch, start=start)
    items = list(sampler)
    assert all(e == epoch for e, _ in items) and len(items) == len(sampler)
    return [i for _, i in items]


def test_train_sharding_gives_ranks_disjoint_equal_shares():
    shares = [indices(EpochSampler(11, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert not set(shares[0]) & set(shares[1])


def test_val_sharding_covers_every_index_exactly_once():
    shares = [indices(EpochSampler(11, seed=0, shuffle=False, rank=r, world_size=3, drop_last=False))
              for r in range(3)]
    assert shares[1] == [1, 4, 7, 10]
    assert sorted(sum(shares, [])) == list(range(11))


def test_a_start_position_skips_the_samples_all_ranks_consumed_before_it():
    sampler = EpochSampler(20, seed=4, rank=1, world_size=2)
    resumed = indices(sampler, epoch=3, start=8)  # 4 samples of each of the 2 ranks
    assert len(resumed) == 6 and resumed == indices(sampler, epoch=3)[4:]


def test_the_rest_of_an_epoch_is_the_same_samples_on_any_number_of_processes():
    # 2 ranks took 6 samples each (positions 0-11 of the global order); 1, 3 or 4 ranks take the others
    def shares(world_size, start=0):
        return [indices(EpochSampler(24, seed=7, rank=r, world_size=world_size), epoch=2, start=start)
                for r in range(world_size)]

    before = [i for share in shares(2) for i in share[:6]]
    for world_size in (1, 3, 4):
        after = [i for share in shares(world_size, start=12) for i in share]
        assert len(after) == 12 and sorted(before + after) == list(range(24))


def test_a_start_position_must_be_a_multiple_of_the_world_size():
    with pytest.raises(ValueError, match="not a multiple of the world size 3"):
        EpochSampler(20, seed=0, rank=0, world_size=3).set_epoch(0, start=4)


def test_shuffle_depends_on_seed_and_epoch():
    order = indices(EpochSampler(50, seed=0), epoch=0)
    assert sorted(order) == list(range(50))
    assert order == indices(EpochSampler(50, seed=0), epoch=0)
    assert order != indices(EpochSampler(50, seed=0), epoch=1)
    assert order != indices(EpochSampler(50, seed=1), epoch=0)


# ---------------------------------------------------------------- device-side steps

def test_mix_transform_is_none_when_both_alphas_are_zero():
    assert data.build_mix_transform(DataConfig(), num_classes=5) is None


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mix_transform_returns_soft_targets_summing_to_one(mixup, cutmix):
    mix = data.build_mix_transform(DataConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), num_classes=5)
    torch.manual_seed(0)
    images, targets = mix(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 4]))
    assert images.shape == (4, 3, 8, 8) and targets.shape == (4, 5)
    assert torch.allclose(targets.sum(1), torch.ones(4))


# ---------------------------------------------------------------- demo dataset

def test_demo_dataset_has_stratified_counts_and_is_not_rewritten(tmp_path):
    dest = tmp_path / "digits"
    first = write_demo_dataset(dest)
    assert first == {"train": 1437, "val": 360, "classes": 10, "path": str(dest), "created": True}
    assert data.find_classes(dest / "train") == [str(d) for d in range(10)]
    # Stratified: each digit keeps its share (~20%) of the 174 to 183 scans per class.
    assert [len(list((dest / "val" / str(d)).iterdir())) for d in range(10)] == [36, 36, 35, 37, 36,
                                                                                 37, 36, 36, 35, 36]
    with Image.open(next((dest / "train" / "0").iterdir())) as image:
        assert image.size == (32, 32) and image.mode == "L"
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary folder left behind
    assert write_demo_dataset(dest)["created"] is False


def test_demo_dataset_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "digits" / "train" / "0").mkdir(parents=True)
    with pytest.raises(DataError, match=r"not a complete demo dataset"):
        write_demo_dataset(tmp_path / "digits")


# ---------------------------------------------------------------- prepare_imagenet_val.py


def test_more_workers_than_cpus_are_capped_with_one_warning(monkeypatch, capsys):
    from mbv2train.data import loaders

    monkeypatch.setattr(loaders, "available_cpus", lambda: 2)
    loaders._warn_workers_capped.cache_clear()
    assert loaders.worker_count(4) == 2
    assert loaders.worker_count(4) == 2
    assert loaders.worker_count(2) == 2
    assert loaders.worker_count(0) == 0
    err = capsys.readouterr().err
    assert err.count("warning: data.num_workers is 4 but only 2 CPUs are available; using 2 workers") == 1
    assert loaders._loader_options(DataConfig(num_workers=8), "cpu")["num_workers"] == 2


@pytest.mark.parametrize("cpus, workers", [(1, 1), (2, 2), (16, 4)])
def test_the_default_worker_count_fits_the_cpus_without_a_word(monkeypatch, capsys, cpus, workers):
    from mbv2train.config import load_config
    from mbv2train.data import loaders

    monkeypatch.setattr(loaders, "available_cpus", lambda: cpus)
    loaders._warn_workers_capped.cache_clear()
    assert loaders._loader_options(load_config(None).data, "cpu")["num_workers"] == workers
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", [["data.num_workers=4"], []])
def test_workers_set_above_the_cpus_are_capped_with_a_warning(monkeypatch, capsys, write_yaml, how):
    from mbv2train.config import load_config
    from mbv2train.data import loaders

    monkeypatch.setattr(loaders, "available_cpus", lambda: 2)
    loaders._warn_workers_capped.cache_clear()
    path = None if how else write_yaml("data:\n  num_workers: 4\n")  # by --set, or in the config file
    assert loaders._loader_options(load_config(path, how).data, "cpu")["num_workers"] == 2
    assert capsys.readouterr().err == "warning: data.num_workers is 4 but only 2 CPUs are available; using 2 workers\n"
