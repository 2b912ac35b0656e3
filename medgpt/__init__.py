"""MedGPT: a script-per-stage toolkit that trains and serves medical chat models."""

__version__ = "0.1.0"
