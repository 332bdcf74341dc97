"""Fuzz targets for the protocol core; see ``targets.py`` and ``run.py``."""
