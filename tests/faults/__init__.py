"""Fault tests: each fault reaches its documented outcome in bounded time, per flavour."""
