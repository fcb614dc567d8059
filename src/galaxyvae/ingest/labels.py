"""Galaxy Zoo vote fractions (Kaggle ``training_solutions_rev1.csv``) joined to images by GalaxyID."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from galaxyvae.errors import InputError

ID_COLUMN = "GalaxyID"
FIRST_QUESTION = {"Class1.1": "smooth", "Class1.2": "features or disk", "Class1.3": "star or artifact"}
"""Galaxy Zoo's first question; the answer with the largest vote fraction becomes the image's family."""


@dataclass
class GalaxyZooLabels:
    """Vote fractions by GalaxyID: ``columns`` names the k answers, ``rows[id]`` is a (k,) float array."""

    path: Path
    columns: list[str]
    rows: dict[str, np.ndarray]

    def votes(self, galaxy_id: str) -> np.ndarray | None:
        """The (k,) vote fractions of ``galaxy_id``, or None if the file has no row for it."""
        return self.rows.get(galaxy_id)

    def family(self, votes: np.ndarray) -> str:
        """The first question's winning answer ("smooth", "features or disk", "star or artifact"),
        or "" if the file lacks those columns."""
        index = [self.columns.index(c) for c in FIRST_QUESTION if c in self.columns]
        if len(index) != len(FIRST_QUESTION):
            return ""
        return list(FIRST_QUESTION.values())[int(np.argmax(votes[index]))]


def read_galaxy_zoo_labels(path: str | Path) -> GalaxyZooLabels:
    """Read a Galaxy Zoo solutions CSV: a ``GalaxyID`` column and one numeric column per answer.

    Raises InputError naming the file (and line) if it is missing, empty, lacks GalaxyID,
    or holds a value that is not a number between 0 and 1.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such labels file (--labels)")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header or ID_COLUMN not in header:
                raise InputError(f"{path}: not a Galaxy Zoo solutions file (no {ID_COLUMN} column in the header)")
            id_index = header.index(ID_COLUMN)
            columns = [name for i, name in enumerate(header) if i != id_index]
            rows = {}
            for line_number, record in enumerate(reader, start=2):
                if not record:
                    continue
                rows[record[id_index].strip()] = _parse_votes(record, id_index, len(header), path, line_number)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text CSV file") from None
    if not rows:
        raise InputError(f"{path}: holds a header but no rows of vote fractions")
    return GalaxyZooLabels(path=path, columns=columns, rows=rows)


def _parse_votes(record: list[str], id_index: int, width: int, path: Path, line_number: int) -> np.ndarray:
    if len(record) != width:
        raise InputError(f"{path}, line {line_number}: {len(record)} fields, expected {width}")
    try:
        votes = np.array([float(v) for i, v in enumerate(record) if i != id_index])
    except ValueError:
        raise InputError(f"{path}, line {line_number}: a vote fraction is not a number") from None
    if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in votes):
        raise InputError(f"{path}, line {line_number}: vote fractions must lie between 0 and 1")
    return votes
