"""The vecpipe command-line app: registry, shared options, error boundary, console, models."""

__version__ = "0.1.0"


def main() -> None:
    """The console script. The app imports every command before it can catch anything, so a
    Ctrl-C in that first second is caught here: exit 130, no traceback."""
    import sys

    try:
        from .app import main as run_app
    except KeyboardInterrupt:
        print("vecpipe: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    run_app()
