"""Worked examples of extending ulma-lightning (docs/extending.md); each runs with `ulma fit`."""
