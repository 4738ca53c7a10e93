"""Installed absl commands (`jsubspace analyze`, `jsubspace demo`)."""
