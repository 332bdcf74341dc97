"""Hostile clients against the service of every adapter flavour."""
