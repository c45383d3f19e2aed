"""Hydra config tree of headless_train (package so Hydra finds it via the module)."""
