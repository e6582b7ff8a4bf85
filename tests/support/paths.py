"""Where the bundled examples live: the repository root, their specs and their frozen fixtures."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_SPEC = ROOT / "specs" / "clip_dnn.toml"
EXAMPLE_FIXTURES = ROOT / "fixtures" / "clip_dnn"
# The second bundled example: transformers CLIPVisionModel + MLP classifier.
CLASSIFIER_SPEC = ROOT / "specs" / "clip_mlp.toml"
CLASSIFIER_FIXTURES = ROOT / "fixtures" / "clip_mlp"
