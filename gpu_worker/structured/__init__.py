"""Grammar-constrained decoding in the worker: per-sequence llguidance matchers and token bitmasks."""
