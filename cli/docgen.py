"""Generate man pages and bash/zsh/fish completions from the command tree.

`python -m vecpipe.cli.docgen [REPO_DIR]` (or `make man`) rewrites man/ and completions/;
a test fails when the committed files differ from what this produces.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

from vecpipe.cli import __version__

DATE = "2026"
EXIT_STATUS = [("0", "success (also when the reader of stdout goes away, as with | head)"),
               ("1", "runtime or data failure; the error names the file and record"),
               ("2", "usage error"), ("130", "interrupted")]


def _ctx(cmd):
    return cmd.context_class(cmd)


def _is_group(cmd) -> bool:
    return hasattr(cmd, "list_commands")


def _is_option(param) -> bool:
    """A visible option (deprecated spellings are hidden ones)."""
    return param.param_type_name == "option" and not param.hidden


def command_tree():
    """[(path, click.Command)] for the root and every (sub)command, in registry order."""
    from vecpipe.cli.app import app

    root = typer.main.get_command(app)
    out = []

    def walk(path, cmd):
        out.append((path, cmd))
        if _is_group(cmd):
            for name in cmd.list_commands(_ctx(cmd)):
                walk(path + [name], cmd.get_command(_ctx(cmd), name))
    walk(["vecpipe"], root)
    return out


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def _split_help(help_text: str) -> tuple[str, list[str]]:
    """Description paragraphs and example lines from a command docstring."""
    text = (help_text or "").replace("\b\n", "").replace("\b", "")
    parts = re.split(r"\n\s*Examples?:\s*\n", text, maxsplit=1)
    description = " ".join(line.strip() for line in parts[0].split("\n\n")[0].splitlines())
    rest = [" ".join(p.split()) for p in parts[0].split("\n\n")[1:] if p.strip()]
    examples = [line.strip() for line in parts[1].splitlines() if line.strip()] \
        if len(parts) > 1 else []
    return "\n\n".join([description, *rest]).strip(), examples


def _option_lines(cmd):
    for param in cmd.params:
        if getattr(param, "hidden", False):
            continue
        if _is_option(param):
            names = ", ".join(param.opts + param.secondary_opts)
            value = "" if param.is_flag else f" {param.metavar or param.name.upper()}"
            yield names + value, param.help or ""
        else:
            yield (param.metavar or param.name.upper()), getattr(param, "help", "") or ""


def man_page(path: list[str], cmd) -> str:
    name = "-".join(path)
    description, examples = _split_help(cmd.help or "")
    summary = (cmd.short_help or description.split(". ")[0]).rstrip(".")
    lines = [f'.TH {name.upper()} 1 "{DATE}" "vecpipe {__version__}" "vecpipe manual"',
             ".SH NAME", f"{_roff(name)} \\- {_roff(summary)}",
             ".SH SYNOPSIS", f".B {_roff(' '.join(path))}",
             _roff(" ".join(cmd.collect_usage_pieces(_ctx(cmd)))),
             ".SH DESCRIPTION", _roff(description)]
    if _is_group(cmd):
        lines.append(".SH COMMANDS")
        for sub in cmd.list_commands(_ctx(cmd)):
            sub_cmd = cmd.get_command(_ctx(cmd), sub)
            lines += [".TP", f".B {_roff(sub)}",
                      _roff(sub_cmd.get_short_help_str(limit=200)),
                      f"See \\fB{_roff('-'.join(path + [sub]))}\\fR(1)."]
    options = list(_option_lines(cmd))
    if options:
        lines.append(".SH OPTIONS")
        for names, help_text in options:
            lines += [".TP", f".B {_roff(names)}", _roff(help_text)]
    if examples:
        lines += [".SH EXAMPLES", ".nf"] + [_roff(e) for e in examples] + [".fi"]
    lines.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        lines += [".TP", f".B {code}", _roff(meaning)]
    lines += [".SH ENVIRONMENT", ".TP", ".B VECPIPE_DEBUG",
              "Set to 1 to print tracebacks with errors.", ".TP", ".B VECPIPE_OUTPUT_FORMAT",
              _roff("The format written to stdout when --output-format is auto (jsonl, arrow, "
                    "arrow-file, parquet; table or json for reports)."), ".SH SEE ALSO",
              "\\fBvecpipe\\fR(1)" if len(path) > 1 else
              ", ".join(f"\\fB{_roff(n)}\\fR(1)" for n in _all_names()[1:])]
    return "\n".join(lines) + "\n"


def _all_names() -> list[str]:
    return ["-".join(path) for path, _ in command_tree()]


def _options_of(cmd) -> list[str]:
    return [opt for p in cmd.params if _is_option(p)
            for opt in p.opts + p.secondary_opts]


def _subcommands(cmd) -> list[str]:
    return cmd.list_commands(_ctx(cmd)) if _is_group(cmd) else []


def bash_completion(tree) -> str:
    cases = []
    for path, cmd in tree[1:]:
        key = " ".join(path[1:])
        words = _subcommands(cmd) + _options_of(cmd) + ["--help"]
        cases.append(f'        "{key}") words="{" ".join(words)}" ;;')
    top = _subcommands(tree[0][1]) + ["--help", "--version"]
    return "\n".join([
        "# bash completion for vecpipe (generated by vecpipe.cli.docgen; do not edit)",
        "_vecpipe() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" path="" i words',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in -*) ;; *) path="${path:+$path }${COMP_WORDS[i]}" ;; '
        "esac",
        "    done",
        '    case "$path" in',
        f'        "") words="{" ".join(top)}" ;;',
        *cases,
        '        *) words="" ;;',
        "    esac",
        '    if [[ -z "$path" || "$cur" == -* ]] || [[ -n "$words" && "$cur" != */* ]]; then',
        '        COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "    fi",
        '    [[ ${#COMPREPLY[@]} -eq 0 ]] && COMPREPLY=($(compgen -f -- "$cur"))',
        "}",
        "complete -o filenames -o bashdefault -F _vecpipe vecpipe", ""])


def _zsh_escape(text: str) -> str:
    return text.replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]") \
        .replace(":", "\\:")


def zsh_completion(tree) -> str:
    lines = ["#compdef vecpipe", "# zsh completion for vecpipe (generated by vecpipe.cli.docgen;"
             " do not edit)", ""]
    for path, cmd in tree:
        fname = "_" + "_".join(p.replace("-", "_") for p in path)
        subs = _subcommands(cmd)
        lines.append(f"{fname}() {{")
        if subs:
            lines.append("    local -a commands")
            lines.append("    commands=(")
            for sub in subs:
                sub_cmd = cmd.get_command(_ctx(cmd), sub)
                lines.append(f"        '{sub}:{_zsh_escape(sub_cmd.get_short_help_str(80))}'")
            lines += ["    )", "    if (( CURRENT == 2 )); then",
                      "        _describe 'command' commands", "        return", "    fi",
                      "    local sub=${words[2]}", "    shift words; (( CURRENT-- ))",
                      f'    (( $+functions[{fname}_${{sub//-/_}}] )) && {fname}_${{sub//-/_}}',
                      "}", ""]
            continue
        specs = []
        for p in cmd.params:
            if _is_option(p):
                for opt in p.opts + p.secondary_opts:
                    arg = "" if p.is_flag else ":value:_files"
                    specs.append(f"'{opt}[{_zsh_escape((p.help or '').split('. ')[0])}]{arg}'")
        specs.append("'*:file:_files'")
        lines.append("    _arguments " + " \\\n        ".join(specs))
        lines += ["}", ""]
    lines.append('_vecpipe "$@"')
    return "\n".join(lines) + "\n"


def fish_completion(tree) -> str:
    lines = ["# fish completion for vecpipe (generated by vecpipe.cli.docgen; do not edit)"]
    for path, cmd in tree:
        depth = len(path) - 1
        if depth == 0:
            cond = "__fish_use_subcommand"
        else:
            cond = " ".join(f"__fish_seen_subcommand_from {p};" for p in path[1:]).rstrip(";")
        for sub in _subcommands(cmd):
            sub_cmd = cmd.get_command(_ctx(cmd), sub)
            help_text = sub_cmd.get_short_help_str(80).replace("'", "\\'")
            lines.append(f"complete -c vecpipe -f -n '{cond}' -a {sub} -d '{help_text}'")
        if depth == 0:
            continue
        for p in cmd.params:
            if not _is_option(p):
                continue
            flags = ""
            for opt in p.opts + p.secondary_opts:
                flags += f" -l {opt[2:]}" if opt.startswith("--") else f" -s {opt[1:]}"
            req = "" if p.is_flag else " -r"
            help_text = (p.help or "").split(". ")[0].replace("'", "\\'")
            lines.append(f"complete -c vecpipe -n '{cond}'{flags}{req} -d '{help_text}'")
    return "\n".join(lines) + "\n"


def generate() -> dict[str, str]:
    """Relative path -> content of every generated file."""
    tree = command_tree()
    files = {f"man/{'-'.join(path)}.1": man_page(path, cmd) for path, cmd in tree}
    files["completions/vecpipe.bash"] = bash_completion(tree)
    files["completions/_vecpipe"] = zsh_completion(tree)
    files["completions/vecpipe.fish"] = fish_completion(tree)
    return files


def main(repo: str = ".") -> None:
    root = Path(repo)
    files = generate()
    for stale in list((root / "man").glob("vecpipe*.1")):
        if f"man/{stale.name}" not in files:
            stale.unlink()
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    print(f"wrote {len(files)} files", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
