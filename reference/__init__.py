"""The training-time side of the bundled example: models as trained and the fixture builder."""
