"""meshplan's planner: specs, formats, cost and memory model, search and placement.

This package never imports torch, so planning runs on any laptop.
"""

__version__ = "0.1.0"
