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


# Option values and positional arguments, by kind: "@file", "@dir", "@none" (free text, a
# number) or a list of choices. Choices come from the vocabularies where they are declared, else
# from an `a|b|c` list in the help text.
FILE_METAVARS = {"PATH", "FILE", "QRELS", "CORPUS", "INPUT", "INPUT [INPUT2]", "RUN", "PAIRS",
                 "[QUERIES]..."}
DIR_METAVARS = {"DIR", "INDEX", "MODEL", "FOLDER"}
_CHOICE_LIST = re.compile(r"(?<![\w|-])([a-z0-9][\w.:-]*(?:\|[\w.:-]+)+)")


def _declared_choices() -> dict[str, tuple[str, ...]]:
    from vecpipe.cli import models, options
    from vecpipe.core.mining import ON_SHORT, SAMPLINGS, SHAPES
    from vecpipe.formats import readers, writers

    return {"--output-format": tuple(writers.KNOWN_FORMATS),
            "--input-format": tuple(readers.INPUT_FORMATS),
            "--dtype": options.STORAGE_DTYPES + tuple(options.SHORT_DTYPES),
            "--index-dtype": options.STORAGE_DTYPES[:5] + tuple(options.SHORT_DTYPES),
            "--precision": options.PRECISIONS, "--on-duplicate": options.ON_DUPLICATE,
            "--backend": ("auto",) + models.BACKENDS, "--shape": SHAPES,
            "--sampling": tuple(SAMPLINGS),
            "--on-short": tuple(ON_SHORT), "--method": ("linear", "slerp")}


def help_choices(help_text: str) -> tuple[str, ...]:
    """The values of every `a|b|c` list in a help text (placeholders such as cuda:N left out)."""
    found = []
    for group in _CHOICE_LIST.findall(help_text or ""):
        for word in group.rstrip(".:").split("|"):
            if word and not any(c.isupper() for c in word) and word not in found:
                found.append(word)
    return tuple(found)


def value_kind(param, declared=None):
    """How to complete the value of an option or argument: "@file", "@dir", "@none" or a tuple
    of choices."""
    declared = _declared_choices() if declared is None else declared
    for name in getattr(param, "opts", []):
        if name in declared:
            return tuple(declared[name])
    choices = getattr(getattr(param, "type", None), "choices", None)
    if choices:
        return tuple(choices)
    if _is_option(param) and help_choices(param.help):
        return help_choices(param.help)
    metavar = (param.metavar or "").strip()
    if metavar in DIR_METAVARS:
        return "@dir"
    if metavar in FILE_METAVARS:
        return "@file"
    return "@none" if _is_option(param) else "@file"


def argument_kinds(path, cmd):
    """[(kind, repeats)] of the command's positional arguments, in order."""
    own = ARGUMENT_KINDS.get(" ".join(path[1:]))
    if own is not None:
        return own()
    return [(value_kind(p), p.nargs == -1) for p in cmd.params
            if p.param_type_name == "argument"]


SHELLS = ("bash", "zsh", "fish")


def _shells():
    return [(SHELLS, False)]


def _command_names():
    return [(tuple(" ".join(p[1:]) for p, _ in command_tree()[1:]
                   if " " not in " ".join(p[1:])), True)]


ARGUMENT_KINDS = {"completion": _shells, "man": _command_names}


def _takes_value(param) -> bool:
    return _is_option(param) and not param.is_flag


def _bash_words(kind) -> str:
    return kind if isinstance(kind, str) else " ".join(kind)


def bash_completion(tree) -> str:
    declared = _declared_choices()
    specs, values, args = [], [], []
    for path, cmd in tree:
        key = " ".join(path[1:])
        opts = _options_of(cmd) + ["--help"]
        takes = [o for p in cmd.params if _takes_value(p) for o in p.opts + p.secondary_opts]
        specs.append(f'        "{key}") subs="{" ".join(_subcommands(cmd))}"; '
                     f'opts="{" ".join(opts)}"; takes="{" ".join(takes)}" ;;')
        for p in cmd.params:
            if _takes_value(p):
                kind = _bash_words(value_kind(p, declared))
                if kind != "@none":
                    names = "|".join(f'"{key} {o}"' for o in p.opts + p.secondary_opts)
                    values.append(f'        {names}) echo "{kind}" ;;')
        if not _is_group(cmd) and len(path) > 1:
            kinds = argument_kinds(path, cmd)
            for n, (kind, repeats) in enumerate(kinds):
                pattern = f'"{key} "*' if repeats else f'"{key} {n}"'
                args.append(f'        {pattern}) echo "{_bash_words(kind)}" ;;')
                if repeats:
                    break
    return "\n".join([
        "# bash completion for vecpipe (generated by vecpipe.cli.docgen; do not edit)",
        "# Options at any position, choices of option values, files, and folders where a",
        "# command takes a folder. Enable: source this file, or `vecpipe completion bash`.",
        "_vecpipe_spec() {",
        '    case "$1" in', *specs, '        *) subs=""; opts="--help"; takes="" ;;', "    esac",
        "}",
        "_vecpipe_value() {",
        '    case "$1 $2" in', *values, '        *) echo "@none" ;;', "    esac", "}",
        "_vecpipe_arg() {",
        '    case "$1 $2" in', *args, '        *) echo "@none" ;;', "    esac", "}",
        "_vecpipe_reply() {",
        '    case "$1" in',
        '        @file) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$2")) ;;',
        '        @dir) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$2")) ;;',
        "        @none) COMPREPLY=() ;;",
        '        *) COMPREPLY=($(compgen -W "$1" -- "$2")) ;;',
        "    esac",
        "}",
        "_vecpipe() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" path="" subs opts takes w i n=0 pending="" rest=""',
        '    _vecpipe_spec ""',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w="${COMP_WORDS[i]}"',
        '        if [[ -n "$rest" ]]; then n=$((n + 1)); continue; fi',
        '        case "$w" in',
        "            --) rest=1 ;;",
        '            -*) if [[ " $takes " == *" $w "* ]]; then',
        '                    [[ "${COMP_WORDS[i+1]}" == "=" ]] && i=$((i + 1))',
        "                    i=$((i + 1))",
        '                    (( i >= COMP_CWORD )) && pending="$w"',
        "                fi ;;",
        '            *) if [[ -n "$subs" && " $subs " == *" $w "* ]]; then',
        '                    path="${path:+$path }$w"; _vecpipe_spec "$path"; n=0',
        "                else",
        "                    n=$((n + 1))",
        "                fi ;;",
        "        esac",
        "    done",
        '    if [[ -n "$pending" ]]; then',
        '        [[ "$cur" == "=" ]] && cur=""',
        '        _vecpipe_reply "$(_vecpipe_value "$path" "$pending")" "$cur"',
        '    elif [[ "$cur" == -* && -z "$rest" ]]; then',
        '        COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
        '    elif [[ -n "$subs" ]]; then',
        '        COMPREPLY=($(compgen -W "$subs" -- "$cur"))',
        "    else",
        '        _vecpipe_reply "$(_vecpipe_arg "$path" "$n")" "$cur"',
        "    fi",
        "}",
        "complete -F _vecpipe vecpipe", ""])


def _zsh_escape(text: str) -> str:
    return text.replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]") \
        .replace(":", "\\:")


def _zsh_action(kind) -> str:
    if kind == "@file":
        return "_files"
    if kind == "@dir":
        return "_files -/"
    if kind == "@none":
        return " "
    return "(" + " ".join(kind) + ")"


def zsh_completion(tree) -> str:
    declared = _declared_choices()
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
                help_text = _zsh_escape((p.help or "").split(". ")[0])
                repeat = "*" if getattr(p, "multiple", False) else ""
                arg = "" if p.is_flag else \
                    f":{p.name}:{_zsh_action(value_kind(p, declared))}"
                for opt in p.opts + p.secondary_opts:
                    specs.append(f"'{repeat}{opt}[{help_text}]{arg}'")
        for n, (kind, repeats) in enumerate(argument_kinds(path, cmd)):
            specs.append(f"'{'*' if repeats else n + 1}:arg:{_zsh_action(kind)}'")
            if repeats:
                break
        lines.append("    _arguments -s " + " \\\n        ".join(specs))
        lines += ["}", ""]
    lines.append('_vecpipe "$@"')
    return "\n".join(lines) + "\n"


def _fish_action(kind) -> str:
    if kind == "@file":
        return " -r -F"
    if kind == "@dir":
        return " -x -a '(__fish_complete_directories (commandline -ct))'"
    if kind == "@none":
        return " -x"
    return " -x -a '" + " ".join(kind) + "'"


def fish_completion(tree) -> str:
    declared = _declared_choices()
    lines = ["# fish completion for vecpipe (generated by vecpipe.cli.docgen; do not edit)"]
    for path, cmd in tree:
        depth = len(path) - 1
        if depth == 0:
            cond = "__fish_use_subcommand"
        else:
            cond = "; and ".join(f"__fish_seen_subcommand_from {p}" for p in path[1:])
        subs = _subcommands(cmd)
        sub_cond = cond if depth == 0 else f"{cond}; and not __fish_seen_subcommand_from " \
            + " ".join(subs)
        for sub in subs:
            sub_cmd = cmd.get_command(_ctx(cmd), sub)
            help_text = sub_cmd.get_short_help_str(80).replace("'", "\\'")
            lines.append(f"complete -c vecpipe -f -n '{sub_cond}' -a {sub} -d '{help_text}'")
        if depth == 0:
            continue
        for p in cmd.params:
            if not _is_option(p):
                continue
            flags = ""
            for opt in p.opts + p.secondary_opts:
                flags += f" -l {opt[2:]}" if opt.startswith("--") else f" -s {opt[1:]}"
            action = "" if p.is_flag else _fish_action(value_kind(p, declared))
            help_text = (p.help or "").split(". ")[0].replace("'", "\\'")
            lines.append(f"complete -c vecpipe -n '{cond}'{flags}{action} -d '{help_text}'")
        if not subs:
            kinds = argument_kinds(path, cmd)
            if kinds and kinds[0][0] != "@file":
                action = _fish_action(kinds[0][0]).replace(" -r", "").replace(" -x", " -f")
                lines.append(f"complete -c vecpipe -n '{cond}'{action}")
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
