"""Engines produce completions. See `base.Engine`."""
