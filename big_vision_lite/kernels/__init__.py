"""Hand-written kernels that XLA calls as custom calls (see each module for when they apply)."""
