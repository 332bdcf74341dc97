"""Load tests: many concurrent clients through every flavour's service, every byte checked."""
