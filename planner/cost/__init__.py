"""The cost and memory model: pure functions of specs + profile (no I/O, no torch)."""
