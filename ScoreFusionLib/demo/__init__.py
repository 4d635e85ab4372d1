"""``scorefusion demo``: the embedded default models on real and simulated data, side by side."""

from .runner import DemoOptions, DemoReport, run_demo

__all__ = ["DemoOptions", "DemoReport", "run_demo"]
