import importlib.util
import re

import pytest

from helpers import REPO
from mbv2train.config import load_config


def test_readme_config_reference_matches_the_config_classes():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (REPO / "README.md").read_text()
    section = re.search(r"<!-- config-reference:.*?-->\n(.*?)<!-- end config-reference -->", readme, re.S)
    assert section.group(1).strip() == module.reference_table()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_source(path):
    load_config(path)
    assert path.read_text().startswith("#")
