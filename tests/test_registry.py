"""The dataset registry: names, config suffixes and the errors a user sees."""

import pytest

from dalle_jax.data import registry
from dalle_jax.errors import UserError


@pytest.mark.parametrize(
    "name,expected",
    [
        ("shapes_world/64", ("shapes_world", "64")),
        ("shapes_world/tiny32", ("shapes_world", "tiny32")),
        ("emoji", ("emoji", None)),
        ("emoji/", ("emoji", None)),
    ],
)
def test_config_suffix_parsing(name, expected):
    assert registry.split_name(name) == expected


def test_spec_ignores_the_config_suffix():
    assert registry.spec("shapes_world/64") is registry.DATASETS["shapes_world"]
    assert registry.spec("coco_captions").extra == "coco"


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UserError) as error:
        registry.spec("mnist/32")
    message = str(error.value)
    assert "'mnist'" in message
    for name in ("coco_captions", "emoji", "image_folder", "shapes_world"):
        assert name in message
    assert "\n" not in message


def test_registry_entries_are_consistent():
    for name, dataset in registry.DATASETS.items():
        assert dataset.name == name
        assert dataset.module.startswith("dalle_jax.data.")
        assert dataset.description


def test_a_missing_extra_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(
        registry.DATASETS,
        "needs_extra",
        registry.DatasetSpec("needs_extra", "no_such_module_xyz", "B", "test", extra="coco"),
    )
    with pytest.raises(UserError, match=r"needs the \[coco\] extra.*pip install"):
        registry.module("needs_extra")


def test_an_unknown_config_lists_the_builders_configs(tmp_path):
    with pytest.raises(UserError) as error:
        registry.builder("emoji/1024", data_dir=str(tmp_path))
    assert "emoji/1024" in str(error.value)
    assert "tiny32" in str(error.value)  # one of the emoji builder's configs


def test_folder_flags_name_an_image_folder_and_nothing_else():
    assert registry.folder_kwargs("image_folder", folder="/pics", image_size=None) == {
        "folder": "/pics"
    }
    assert registry.folder_kwargs("image_folder/32", folder="/pics", image_size=32) == {
        "folder": "/pics",
        "image_size": 32,
    }
    assert registry.folder_kwargs("shapes_world/64", folder=None, image_size=None) == {}
    # Where the command resizes other datasets itself, their image size is not a builder's.
    resized = registry.folder_kwargs(
        "shapes_world/64", folder=None, image_size=32, image_size_resizes=True
    )
    assert resized == {}
    with pytest.raises(UserError, match="needs --folder DIR"):
        registry.folder_kwargs("image_folder", folder=None, image_size=64)
    with pytest.raises(UserError, match="--folder, --image-size: image_folder only"):
        registry.folder_kwargs("emoji/32", folder="/pics", image_size=32)
