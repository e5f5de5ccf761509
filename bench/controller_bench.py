"""`bench/run.py` entry for bench/controller.py: the control plane's overhead per DataVolume."""

from controller import main

__all__ = ["main"]
