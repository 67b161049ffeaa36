"""evalpipe: how much does grammar-constrained decoding change pass@k, syntax validity and latency?"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("evalpipe")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+unknown"
