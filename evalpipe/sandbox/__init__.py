"""Sandboxes run untrusted programs outside the evalpipe process. See `base.Sandbox`."""
