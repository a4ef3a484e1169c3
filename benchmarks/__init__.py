"""benchmarks package of the BSSAN project."""
