"""export package of the BSSAN project."""
