"""A deterministic stratified subset of a large fixture (`parity check --sample K`).

Strata are the values of each categorical label and input bias, the image mode, the EXIF
orientation tag and the aspect ratio (portrait, square, landscape). Every value present is
covered by at least one sampled row (a greedy set cover), and the rest of the sample is
allocated to the joint strata in proportion to their size. Rows are ranked by a hash of their
name, so the same fixture and K give the same sample on every machine.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import replace

from parity.errors import SpecError
from parity.store.fixtures import Fixture, FixtureRow

__all__ = ["STRATA", "row_strata", "stratified_rows", "sample_fixture", "sample_notes"]

STRATA = "label and input-bias values, image mode, EXIF orientation, aspect ratio"
_SQUARE = 1.1  # within 10 % of square counts as square
_EXIF_ORIENTATION = 0x0112


def _aspect(width: int, height: int, orientation: int) -> str:
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees once transposed
        width, height = height, width
    ratio = width / max(height, 1)
    return "landscape" if ratio > _SQUARE else "portrait" if ratio < 1 / _SQUARE else "square"


def _image_strata(row: FixtureRow) -> dict[str, object]:
    from PIL import Image

    try:
        with Image.open(row.image) as image:  # reads the header only
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 0))
            return {"mode": image.mode, "exif_orientation": orientation,
                    "aspect": _aspect(image.width, image.height, orientation)}
    except OSError:
        return {"mode": "unreadable"}  # kept as its own stratum: the decode stage must see it


def row_strata(rows: tuple[FixtureRow, ...]) -> list[dict[str, object]]:
    """Per row, ``stratum -> value``. Labels count only where every value is a whole number (a class)."""
    width = max((len(row.labels) for row in rows), default=0)
    categorical = [all(j < len(r.labels) and float(r.labels[j]).is_integer() for r in rows) for j in range(width)]
    out = []
    for row in rows:
        strata: dict[str, object] = {f"input_biases[{j}]": b for j, b in enumerate(row.input_biases)}
        strata.update({f"labels[{j}]": v for j, v in enumerate(row.labels) if categorical[j]})
        strata.update(_image_strata(row))
        out.append(strata)
    return out


def _rank(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def stratified_rows(strata: list[Mapping[str, object]], names: list[str], k: int) -> list[int]:
    """``k`` row indices (sorted) covering every stratum value present, the rest proportional to joint strata.

    Raises:
        SpecError: ``k`` below 1, or too small to cover every stratum value (the message gives the minimum).
    """
    n = len(names)
    if k < 1:
        raise SpecError(f"--sample must be >= 1, got {k}")
    if k >= n:
        return list(range(n))
    order = sorted(range(n), key=lambda i: _rank(names[i]))
    position = {i: p for p, i in enumerate(order)}
    values = [set(s.items()) for s in strata]
    uncovered = set().union(*values) if values else set()
    chosen: list[int] = []
    while uncovered:
        best = max(order, key=lambda i: (len(values[i] & uncovered), -position[i]))
        chosen.append(best)
        uncovered -= values[best]
    if len(chosen) > k:
        raise SpecError(f"--sample {k} cannot cover every stratum present ({STRATA}): the smallest sample that "
                        f"covers them has {len(chosen)} rows. Fix: pass --sample {len(chosen)} or more")
    joint = [tuple(sorted((key, str(v)) for key, v in s.items())) for s in strata]
    size = Counter(joint)
    taken = Counter(joint[i] for i in chosen)
    queue = defaultdict(list)
    for i in order:
        if i not in chosen:
            queue[joint[i]].append(i)
    while len(chosen) < k:
        # Largest shortfall against a proportional share first; ties by the stratum's name.
        stratum = max((s for s in queue if queue[s]), key=lambda s: (k * size[s] / n - taken[s], str(s)))
        chosen.append(queue[stratum].pop(0))
        taken[stratum] += 1
    return sorted(chosen)


def sample_fixture(fixture: Fixture, k: int) -> Fixture:
    """The fixture restricted to a stratified sample of ``k`` rows; the manifest copy records the sample."""
    strata = row_strata(fixture.rows)
    picked = stratified_rows(strata, fixture.names, k)
    covered = len({item for s in strata for item in s.items()})
    sampled = {"k": len(picked), "of": len(fixture.rows), "strata": covered, "rows": [fixture.rows[i].name for i in picked]}
    return replace(fixture.subset(picked), manifest={**fixture.manifest, "sampled": sampled})


def sample_notes(fixture: Fixture) -> list[str]:
    """What a sampled run's statements hold for; nothing for a whole fixture."""
    sampled = fixture.manifest.get("sampled")
    if not sampled:
        return []
    return [f"sampled {sampled['k']} of {sampled['of']} samples, stratified by {STRATA} "
            f"({sampled['strata']} stratum values, every one covered); the flip-rate bounds count the sampled decisions only"]
