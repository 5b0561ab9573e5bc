"""The vecpipe command-line app: registry, shared options, error boundary, console, models."""

__version__ = "0.1.0"
