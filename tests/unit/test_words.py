"""mbv2train.words: counts with their noun in the singular or the plural."""

import pytest

from mbv2train.words import plural


@pytest.mark.parametrize("count, noun, expected", [
    (1, "file", "1 file"), (2, "file", "2 files"), (0, "file", "0 files"),
    (1, "class", "1 class"), (3, "class", "3 classes"),
    (1, "process", "1 process"), (2, "process", "2 processes"),
    (1, "batch", "1 batch"), (2, "batch", "2 batches"),
    (1, "CPU", "1 CPU"), (4, "CPU", "4 CPUs"),
    (1, "class folder", "1 class folder"), (2, "class folder", "2 class folders"),
    (1, "train image", "1 train image"), (21, "train image", "21 train images"),
])
def test_a_count_of_one_takes_the_singular_and_any_other_the_plural(count, noun, expected):
    assert plural(count, noun) == expected
