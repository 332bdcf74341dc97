"""Adapter tests: one suite for every flavour (blocking, asyncio, trio)."""
