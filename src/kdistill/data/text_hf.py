"""``hf_dataset``: labelled texts read with Hugging Face ``datasets`` from local data only.

``path`` is a folder written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` of named
splits) or a data file (``.csv``, ``.tsv``, ``.jsonl``/``.json``, ``.parquet``) read with the
matching packaged builder. Nothing is ever downloaded: only paths are passed, and the builder's
cache lives in a temporary folder removed after reading. A ``ClassLabel`` column keeps its
names (``label_names``) unless ``labels`` gives others.

The package is optional (``pip install 'kdistill[text]'``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from kdistill.data.base import DataSplits
from kdistill.data.labels import LabelType
from kdistill.data.tables import printable
from kdistill.data.text import TextTable, text_splits, text_value
from kdistill.data.text_files import TextColumns, existing_file
from kdistill.names import unknown_name

INSTALL = "pip install 'kdistill[text]'"
# suffix -> (packaged builder, its options)
BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


def import_datasets() -> ModuleType:
    """The ``datasets`` package, or an error giving the command that installs it."""
    # Deferred: datasets is optional (the 'text' extra) and takes over a second to import.
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data set 'hf_dataset' needs the datasets package; install it "
                         f"with: {INSTALL}") from None
    return datasets


@contextmanager
def _quiet(datasets: ModuleType) -> Iterator[None]:
    """No progress bars and no logged errors (kdistill reports them itself) while reading."""
    bars_off = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_off:
            datasets.enable_progress_bars()


def _read_file(datasets: ModuleType, file: str | Path) -> Any:
    """One data file as a ``datasets.Dataset`` held in memory."""
    path = existing_file(file)
    if path.suffix.lower() not in BUILDERS:
        raise ValueError(f"{path}: cannot tell the format from the suffix '{path.suffix}'; use "
                         f"{', '.join(BUILDERS)}, or a folder written by save_to_disk")
    builder, options = BUILDERS[path.suffix.lower()]
    with tempfile.TemporaryDirectory() as cache, _quiet(datasets):
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train",
                                         cache_dir=cache, keep_in_memory=True, **options)
        except datasets.exceptions.DatasetsError as error:
            cause = error.__cause__ or error
            raise ValueError(printable(f"{path}: datasets cannot read it as {builder}: "
                                       f"{str(cause).strip()}")) from None


def _read_folder(datasets: ModuleType, path: Path, train_split: str,
                 test_split: str | None) -> tuple[tuple[str, Any], tuple[str, Any] | None]:
    """The training and test splits of a ``save_to_disk`` folder, each with its source name;
    the test split is None when there is none to use (the training split is then split)."""
    try:
        with _quiet(datasets):
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except FileNotFoundError as error:
        raise ValueError(f"{path}: not a folder written by save_to_disk ({error})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        if test_split is not None:
            raise ValueError(f"{path}: holds a single Dataset without named splits; remove "
                             "test_split (the test split is then held out of it)")
        return (str(path), loaded), None

    def split(option: str, name: str) -> tuple[str, Any]:
        if name not in loaded:
            raise ValueError(f"{path}: {option}: {unknown_name('split', name, loaded)}")
        return f"{path} (split '{name}')", loaded[name]

    train = split("train_split", train_split)
    if test_split is not None:
        return train, split("test_split", test_split)
    return train, split("test_split", "test") if "test" in loaded else None


def read_splits(datasets: ModuleType, path: Path, test_path: str | None, train_split: str,
                test_split: str | None) -> tuple[tuple[str, Any], tuple[str, Any] | None]:
    """The training split and the test split (None when there is none to use), each with its
    source name: a ``save_to_disk`` folder's named splits, or the data file ``path`` and
    ``test_path``."""
    if path.is_dir():
        if test_path is not None:
            raise ValueError(f"{path} is a save_to_disk folder, which holds its own splits; "
                             "remove test_path (name the split with test_split)")
        return _read_folder(datasets, path, train_split, test_split)
    if test_split is not None or train_split != "train":
        raise ValueError(f"{path} is a data file without named splits; give the test file "
                         "as test_path instead of train_split/test_split")
    train = str(path), _read_file(datasets, path)
    return train, None if test_path is None else (test_path, _read_file(datasets, test_path))


def check_columns(source: str, dataset: Any, named: dict[str, str]) -> None:
    """Refuse a column (``named``: option -> column) that the ``datasets.Dataset`` lacks."""
    present = list(dataset.column_names)
    for option, column in named.items():
        if column not in present:
            raise ValueError(printable(f"{source}: {option} '{column}' is not a column; "
                                       f"columns present: {', '.join(present)}"))


def _table(datasets: ModuleType, source: str, dataset: Any,
           columns: TextColumns) -> tuple[TextTable, list[str] | None]:
    """The texts of a ``datasets.Dataset`` and the names of its ``ClassLabel`` label column
    (None when the column holds raw labels)."""
    check_columns(source, dataset, columns.named())
    values = list(dataset[columns.label])
    feature = dataset.features[columns.label]
    names = None
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        values = [names[v] if v is not None and v >= 0 else None for v in values]

    def texts(column: str) -> list[str]:
        return [text_value(value, f"{source}, row {row}", printable(f"column '{column}'"))
                for row, value in enumerate(dataset[column])]

    table = TextTable(source, texts(columns.text), values, list(range(len(values))),
                      pairs=None if columns.pair is None else texts(columns.pair), unit="row")
    return table, names


def load_hf_dataset(path: str | Path, text_column: str = "text",
                    pair_column: str | None = None, label_column: str = "label",
                    test_path: str | None = None, train_split: str = "train",
                    test_split: str | None = None, labels: list[str] | None = None,
                    label_type: LabelType = "class", test_fraction: float = 0.25,
                    seed: int = 0) -> DataSplits:
    """Labelled texts (or pairs) through ``datasets``: from a ``save_to_disk`` folder (its
    ``train_split``, and ``test_split`` or else its ``test`` split when it has one) or from a
    data file (and ``test_path``). Without a test split, a seeded stratified split holds
    ``test_fraction`` out. Columns and labels work as for the ``text`` data set."""
    datasets = import_datasets()
    columns = TextColumns(text_column, pair_column, label_column)
    path = Path(path)
    train, test = read_splits(datasets, path, test_path, train_split, test_split)
    train_table, names = _table(datasets, *train, columns)
    test_table = None if test is None else _table(datasets, *test, columns)[0]
    if names is not None and label_type == "score":
        raise ValueError(f"{train[0]}: column '{label_column}' holds class labels (a "
                         "ClassLabel), not scores; remove label_type 'score'")
    return text_splits(path.stem, train_table, test_table, test_fraction, seed, label_type,
                       labels if labels is not None else names)
