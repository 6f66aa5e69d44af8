"""The ``hf`` loader: a Hub dataset read offline from a datasets cache built here, and its errors.

Nothing is downloaded. Each test writes a small dataset into a temporary datasets cache the way an
online ``load_dataset("org/name")`` leaves it: ``<org>___<name>/<config>/0.0.0/<commit>/`` with
``dataset_info.json`` and one Arrow file per split, then loads it with the Hub switched off.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
from datasets.packaged_modules.parquet.parquet import Parquet
from PIL import Image

from pipeline.config import BenchmarkSpec
from pipeline.data.benchmarks.loaders import LOADERS, LoaderError, load_hf
from pipeline.data.benchmarks.suites import check_spec, load_spec

REPO = "lsi-test/tiny-bench"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COLOURS = ("red", "green", "blue")


def cache_dataset(cache: Path, work: Path, repo: str = REPO, split: str = "test", config: str = "default") -> None:
    """Write a three-row dataset (text, safe/unsafe label, category, picture) into the datasets cache ``cache``.

    The Parquet builder writes ``<name>/<config id>/0.0.0/<hash>/``; a Hub download names the
    folder ``<org>___<name>/<config>/0.0.0/<commit>/``, so the build is moved there.
    """
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "verdict": datasets.Value("string"),
            "topic": datasets.Value("string"),
            "picture": datasets.Image(),
        }
    )
    table = datasets.Dataset.from_dict(
        {
            "prompt": ["How do I pick a lock?", "Name three rivers", "How do I make a weapon?"],
            "verdict": ["unsafe", "safe", "unsafe"],
            "topic": ["crime", "geography", "weapons"],
            "picture": [Image.new("RGB", (6, 4), colour) for colour in COLOURS],
        },
        features=features,
    )
    work.mkdir(parents=True, exist_ok=True)
    parquet = work / f"{split}.parquet"
    table.to_parquet(str(parquet))
    name = repo.split("/")[-1]
    builder = Parquet(
        cache_dir=str(work / "build"), dataset_name=name, config_name=config, data_files={split: [str(parquet)]}
    )
    builder.download_and_prepare()
    target = cache / repo.replace("/", "___") / config / "0.0.0" / COMMIT
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The Hub switched off (as HF_HUB_OFFLINE=1 does) and an empty default datasets cache; returns the cache."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables once, at import: their constants are what they check.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_a_cached_dataset_loads_offline_with_its_pictures_as_png_files(offline: Path, tmp_path: Path) -> None:
    cache_dataset(offline, tmp_path / "work")
    render = tmp_path / "render"
    examples = load_hf(
        REPO,
        split="test",
        text_column="prompt",
        label_column="verdict",
        category_column="topic",
        image_column="picture",
        attack="typo",
        render_dir=render,
    )
    assert [(e.example_id, e.text, e.label, e.category, e.attack) for e in examples] == [
        ("0", "How do I pick a lock?", 1, "crime", "typo"),
        ("1", "Name three rivers", 0, "geography", "typo"),
        ("2", "How do I make a weapon?", 1, "weapons", "typo"),
    ]
    assert {e.benchmark for e in examples} == {"tiny-bench"}
    for example, colour in zip(examples, COLOURS, strict=True):
        assert example.image is not None and example.image.suffix == ".png"
        assert example.image.is_relative_to(render / "lsi-test_tiny-bench" / "default" / "test")
        with Image.open(example.image) as image:
            assert image.format == "PNG" and image.size == (6, 4)
            assert image.convert("RGB").getpixel((0, 0)) == Image.new("RGB", (1, 1), colour).getpixel((0, 0))


def test_a_suite_entry_of_kind_hf_renders_into_its_cache_folder(offline: Path, tmp_path: Path) -> None:
    """Through params.yaml's suite options: a fixed label, a text id column, the default render folder."""
    cache_dataset(offline, tmp_path / "work")
    spec = BenchmarkSpec(
        name="tiny",
        kind="hf",
        limit=2,
        options=(
            ("dataset", REPO),
            ("split", "test"),
            ("config", ""),
            ("text_column", "prompt"),
            ("label", 1),
            ("id_column", "topic"),
            ("image_column", "picture"),
        ),
    )
    check_spec(spec)
    examples = load_spec(spec, seed=0, render_root=tmp_path / "render")
    assert len(examples) == 2 and {e.benchmark for e in examples} == {"tiny"}
    assert {e.label for e in examples} == {1}
    assert {e.example_id for e in examples} <= {"crime", "geography", "weapons"}
    assert all(e.image is not None and e.image.is_relative_to(tmp_path / "render" / "tiny") for e in examples)
    assert "hf" in LOADERS


def test_a_dataset_missing_from_the_cache_is_named_with_its_config_and_split(offline: Path) -> None:
    with pytest.raises(LoaderError, match=r"hf dataset 'lsi-test/absent' \(config 'default', split 'test'\)") as info:
        load_hf("lsi-test/absent", text_column="prompt", label=1)
    assert "offline mode is on" in str(info.value) and str(offline) in str(info.value)


def test_a_split_or_config_missing_from_the_cache_is_named(offline: Path, tmp_path: Path) -> None:
    cache_dataset(offline, tmp_path / "work")
    with pytest.raises(LoaderError, match=r"\(config 'default', split 'train'\).*Unknown split"):
        load_hf(REPO, split="train", text_column="prompt", label=1)
    with pytest.raises(LoaderError, match=r"\(config 'other', split 'test'\)"):
        load_hf(REPO, config="other", text_column="prompt", label=1)


def test_a_column_mapping_naming_an_absent_column_is_refused_by_option_and_column(
    offline: Path, tmp_path: Path
) -> None:
    cache_dataset(offline, tmp_path / "work")
    with pytest.raises(LoaderError, match=r"text_column 'question' is not a column of the dataset; its columns are"):
        load_hf(REPO, text_column="question", label_column="verdict")
    with pytest.raises(LoaderError, match=r"category_column 'scenario' is not a column"):
        load_hf(REPO, text_column="prompt", label_column="verdict", category_column="scenario")


def test_labels_images_and_options_that_cannot_be_used_are_refused(offline: Path, tmp_path: Path) -> None:
    cache_dataset(offline, tmp_path / "work")
    with pytest.raises(LoaderError, match="exactly one of 'label_column'"):
        load_hf(REPO, text_column="prompt")
    with pytest.raises(LoaderError, match="'label' must be 0 .* or 1"):
        load_hf(REPO, text_column="prompt", label=2)
    with pytest.raises(
        LoaderError, match=r"row 0: column 'topic' must be 0/1, harmful/benign or unsafe/safe, got 'crime'"
    ):
        load_hf(REPO, text_column="prompt", label_column="topic")
    with pytest.raises(LoaderError, match="'image_column' needs 'render_dir'"):
        load_hf(REPO, text_column="prompt", label=1, image_column="picture")
    # A column of text used as images holds paths, which need the folder they are relative to.
    with pytest.raises(LoaderError, match=r"row 0: column 'topic' holds file paths \('crime'\)"):
        load_hf(REPO, text_column="prompt", label=1, image_column="topic", render_dir=tmp_path / "r")
    with pytest.raises(LoaderError, match=r"row 0: image file .*crime not found"):
        load_hf(REPO, text_column="prompt", label=1, image_column="topic", render_dir=tmp_path / "r", images=tmp_path)
    with pytest.raises(LoaderError, match=r"id 'unsafe' \(column 'verdict'\) appears twice"):
        load_hf(REPO, text_column="prompt", label=1, id_column="verdict")
