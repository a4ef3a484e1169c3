"""training package of the BSSAN project."""
