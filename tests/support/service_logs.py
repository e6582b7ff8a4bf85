"""What a service running a spec would log: one JSON line (or CSV row) per example image."""

from __future__ import annotations

import csv as csv_module
import json
from pathlib import Path

import torch

from parity.model.pipeline import build_pipeline
from parity.spec import Spec
from parity.store.fixtures import load_fixture
from tests.support.paths import EXAMPLE_FIXTURES


def log_service(spec: Spec, path: Path, *, rows: int = 6, embedding: bool = True, outputs: bool = True,
                csv: bool = False) -> Path:
    """Write what a service running ``spec`` would log for the first ``rows`` example images."""
    pipeline = build_pipeline(spec)
    records = []
    for row in load_fixture(EXAMPLE_FIXTURES).rows[:rows]:
        record = {"image": str(row.image.resolve()), "input_biases": list(row.input_biases)}
        emb = pipeline.embed(torch.stack([pipeline.preprocess(row.image)]))
        if embedding:
            record["embedding"] = emb[0].tolist()
        if outputs:
            record["outputs"] = pipeline.run_head(emb, [row.input_biases])[0].tolist()
        records.append(record)
    if csv:
        with open(path, "w", newline="") as f:
            writer = csv_module.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
