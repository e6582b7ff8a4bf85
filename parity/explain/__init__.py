"""The explainer: what moved, why, and the change that fixes it."""
