"""Preprocessing: the library-neutral transform, its config, and how two preprocessings differ."""
