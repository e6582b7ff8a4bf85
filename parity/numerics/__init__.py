"""Numerics: emulated reduced precision, the referee, and calibrated tolerances."""
