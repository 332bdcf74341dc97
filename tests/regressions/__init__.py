"""Inputs that once crashed a fuzz target, replayed on every test run."""
