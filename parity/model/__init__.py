"""The spec's model: the pipeline, the one decode -> embed batch loop, the Ray engine, numerics."""
