"""Show the manual page of vecpipe or of one of its commands."""
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options


def run(command: Annotated[Optional[List[str]], typer.Argument(
        help="The command, e.g. embed, eval beir or eval-beir (default: vecpipe itself).",
        metavar="COMMAND", show_default=False)] = None,
        quiet: options.Quiet = False):
    """Show a command's manual page: through `man -l` on a terminal (when man is installed),
    else the page's roff source on stdout (`vecpipe man embed > vecpipe-embed.1`).

    \b
    Example:
      vecpipe man
      vecpipe man search
      vecpipe man eval beir
    """
    from vecpipe.cli import docgen
    from vecpipe.formats.errors import UsageError

    words = [part for word in command or [] for part in word.replace("-", " ").split()]
    tree = {"-".join(path[1:]): (path, cmd) for path, cmd in docgen.command_tree()}
    wanted = "-".join(words)
    if wanted not in tree:  # a name with a hyphen of its own (mine-negatives)
        wanted = "-".join(command or [])
    if wanted not in tree:
        names = ", ".join(name for name in tree if name)
        raise UsageError(f"no manual page for {' '.join(command or [])!r}; commands: {names}")
    path, cmd = tree[wanted]
    page = docgen.man_page(path, cmd)
    man = shutil.which("man")
    if man is None or not sys.stdout.isatty():
        print(page, end="", flush=True)
        return
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, f"{'-'.join(path)}.1")
        with open(source, "w") as handle:
            handle.write(page)
        code = subprocess.call([man, "-l", source])
    if code:
        raise typer.Exit(code)
