"""Preflight, the first stage of a run: every check before anything is launched."""
