"""Print the shell completion script for bash, zsh or fish."""
from typing import Annotated

import typer

from vecpipe.cli import options
from vecpipe.cli.docgen import SHELLS


def run(shell: Annotated[str, typer.Argument(
        help="bash|zsh|fish: the shell to print the completion script for.",
        metavar="SHELL", show_default=False)],
        quiet: options.Quiet = False):
    """Print the completion script of a shell on stdout: options at any position, the choices
    of option values, files, and folders where a folder is expected.

    \b
    Example:
      source <(vecpipe completion bash)          # in ~/.bashrc
      vecpipe completion zsh > ~/.zfunc/_vecpipe  # a folder on $fpath
      vecpipe completion fish > ~/.config/fish/completions/vecpipe.fish
    """
    from vecpipe.cli import docgen
    from vecpipe.formats.errors import UsageError

    if shell not in SHELLS:
        raise UsageError(f"unknown shell {shell!r}; choose from {'|'.join(SHELLS)}")
    make = {"bash": docgen.bash_completion, "zsh": docgen.zsh_completion,
            "fish": docgen.fish_completion}[shell]
    print(make(docgen.command_tree()), end="", flush=True)
