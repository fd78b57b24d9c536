"""The one place qmerge's version is written (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
GENERATOR = f"qmerge {__version__}"  # what a pack's manifest records as its writer
