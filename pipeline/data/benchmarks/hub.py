"""Benchmarks from the Hugging Face Hub, read through ``datasets.load_dataset`` (kind ``hf``).

The dataset is named as on the Hub (``org/name``, with a config and a split) and its columns are
mapped onto :class:`~pipeline.data.benchmarks.schema.EvalExample`: the text, the label (a column,
or one label for every row), and optionally an id, a category, an attack and an image.
Images that the dataset holds as pictures (its ``Image`` feature) are written as PNG files under
``render_dir``, so the rest of the pipeline reads paths as it does for every other benchmark; an
image column of text holds paths, read relative to ``images``.

With ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) ``datasets`` reads only its own cache
(``HF_DATASETS_CACHE``, or ``cache_dir``): the folder ``<org>___<name>/<config>/<version>/<commit>/``
that an earlier online ``load_dataset`` left there. A dataset, config or split the cache lacks is a
:class:`LoaderError` naming them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data.benchmarks.generic import GENERIC_LABELS
from pipeline.data.benchmarks.schema import EvalExample, LoaderError, existing_image, str_value
from pipeline.images import save_png

# What load_dataset raises for a dataset it cannot find or read: ConnectionError when offline (or
# unreachable) and not cached, ValueError for an unknown split or config, FileNotFoundError
# (DatasetNotFoundError included) for an unknown name, and OSError for an unreadable cache.
_LOAD_ERRORS = (ConnectionError, FileNotFoundError, ValueError, OSError)


def _what(dataset: str, config: str | None, split: str) -> str:
    """How errors name the dataset: ``hf dataset 'org/name' (config 'c', split 's')``."""
    return f"hf dataset {dataset!r} (config {config or 'default'!r}, split {split!r})"


def _open(dataset: str, config: str | None, split: str, revision: str | None, cache_dir: Path | None) -> Any:
    """The ``datasets.Dataset`` of one split, from the Hub or the local cache; a clear error when neither has it."""
    import datasets  # seconds of import, needed only by this loader

    try:
        return datasets.load_dataset(
            dataset,
            config,
            split=split,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except _LOAD_ERRORS as exc:
        cache = cache_dir or datasets.config.HF_DATASETS_CACHE
        offline = " (offline mode is on)" if datasets.config.HF_HUB_OFFLINE else ""
        raise LoaderError(
            f"{_what(dataset, config, split)}: cannot be loaded from the Hub{offline} or from the datasets cache "
            f"{cache} ({type(exc).__name__}: {exc}). Check the name, config and split on the dataset's page, and "
            "load it once where the Hub is reachable to fill the cache"
        ) from None


def _check_columns(found: list[str], mapping: dict[str, str | None], what: str) -> None:
    """Refuse a column mapping that names a column the dataset lacks, naming the option and the column."""
    for option, column in mapping.items():
        if column is not None and column not in found:
            raise LoaderError(f"{what}: {option} {column!r} is not a column of the dataset; its columns are {found}")


def _label(value: Any, column: str, where: str) -> int:
    """0 or 1 from 0/1, true/false, harmful/benign or unsafe/safe."""
    if isinstance(value, bool):
        return int(value)
    key = value.strip().lower() if isinstance(value, str) else value
    if key not in GENERIC_LABELS:
        raise LoaderError(f"{where}: column '{column}' must be 0/1, harmful/benign or unsafe/safe, got {value!r}")
    return GENERIC_LABELS[key]


def _attack(value: str) -> str:
    """An attack name as the other loaders write it: lower case, spaces and hyphens as underscores."""
    return value.lower().replace("-", "_").replace(" ", "_")


def _slug(text: str) -> str:
    """A folder name from a dataset name, config or split (letters, digits, ``-``, ``_``, ``.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "_"


def _image_path(value: Any, column: str, where: str, png: Path, images: Path | None) -> Path | None:
    """Where the record's image is: a picture written to ``png``, or a path relative to ``images``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, Image.Image):
        save_png(value, png)
        return png
    if isinstance(value, str):
        if images is None:
            raise LoaderError(
                f"{where}: column '{column}' holds file paths ({value!r}); give the folder they are relative to "
                "as the option 'images'"
            )
        candidate = Path(value.strip())
        return existing_image(candidate if candidate.is_absolute() else Path(images) / candidate, where)
    raise LoaderError(f"{where}: column '{column}' must hold an image or a file path, got {type(value).__name__}")


def load_hf(
    dataset: str,
    split: str = "test",
    config: str | None = None,
    text_column: str = "text",
    label_column: str | None = None,
    label: int | None = None,
    category_column: str | None = None,
    id_column: str | None = None,
    image_column: str | None = None,
    attack_column: str | None = None,
    attack: str = "none",
    images: Path | None = None,
    render_dir: Path | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[EvalExample]:
    """One split of a Hub dataset in the common schema, by column mapping.

    ``label_column`` holds 0/1, true/false, harmful/benign or unsafe/safe; ``label`` (0 or 1)
    instead labels every row (benchmarks of harmful requests only). Without ``id_column`` the id
    is the row number; without ``category_column`` the category is "unknown"; without
    ``attack_column`` the attack is ``attack``. Pictures in ``image_column`` are written to
    ``render_dir/<dataset>/<config>/<split>/<row>.png``; paths in it are read relative to ``images``.
    ``benchmark`` is the dataset's name (the suite renames it to the spec's name).
    """
    config = config or None  # YAML's empty text means the default config
    what = _what(dataset, config, split)
    if (label_column is None) == (label is None):
        raise LoaderError(f"{what}: give exactly one of 'label_column' (a column of labels) and 'label' (0 or 1)")
    if label is not None and (isinstance(label, bool) or label not in (0, 1)):
        raise LoaderError(f"{what}: 'label' must be 0 (benign) or 1 (harmful), got {label!r}")
    rows = _open(dataset, config, split, revision, None if cache_dir in (None, "") else Path(str(cache_dir)))
    mapping = {
        "text_column": text_column,
        "label_column": label_column,
        "category_column": category_column,
        "id_column": id_column,
        "image_column": image_column,
        "attack_column": attack_column,
    }
    _check_columns(list(rows.column_names), mapping, what)
    if image_column is not None and render_dir is None:
        raise LoaderError(f"{what}: 'image_column' needs 'render_dir', the folder its pictures are written to")
    png_dir = (
        None if render_dir is None else Path(render_dir) / _slug(dataset) / _slug(config or "default") / _slug(split)
    )

    examples: list[EvalExample] = []
    for number, row in enumerate(rows):
        where = f"{what} row {number}"
        image = None
        if image_column is not None:
            assert png_dir is not None
            image = _image_path(row[image_column], image_column, where, png_dir / f"{number}.png", images)
        examples.append(
            EvalExample(
                example_id=str_value(row, id_column, where) if id_column else str(number),
                benchmark=dataset.split("/")[-1],
                text=str_value(row, text_column, where),
                image=image,
                label=int(label or 0) if label_column is None else _label(row[label_column], label_column, where),
                category=str_value(row, category_column, where) if category_column else "unknown",
                attack=_attack(str_value(row, attack_column, where)) if attack_column else attack,
            )
        )
    if not examples:
        raise LoaderError(f"{what}: the split has no rows")
    seen: set[str] = set()
    for example in examples:
        if example.example_id in seen:
            raise LoaderError(f"{what}: id {example.example_id!r} (column {id_column!r}) appears twice")
        seen.add(example.example_id)
    return examples
