"""The vecpipe command-line app: registry, shared options, error boundary, console, models."""

from vecpipe.formats import __version__  # noqa: F401 - vecpipe --version


def main() -> None:
    """The console script. The app imports every command before it can catch anything, so a
    Ctrl-C in that first second is caught here: exit 130, no traceback."""
    import sys

    try:
        from vecpipe.cli.app import main as run_app
    except KeyboardInterrupt:
        print("vecpipe: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    run_app()
