"""Python package of unimlm-engine."""
