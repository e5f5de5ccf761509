"""`bench/run.py` entry for bench/upload.py: curl through our upload proxy, direct, and a floor."""

from upload import main

__all__ = ["main"]
