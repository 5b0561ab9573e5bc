"""Show what a stream or index holds: format, rows, columns, vecpipe metadata, size."""
import json
import os
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options


def run(inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Record files, index folders, or - for stdin (the default).",
            show_default=False, metavar="INPUT")] = None,
        input_format: options.InputFormat = "auto",
        as_json: Annotated[bool, typer.Option(
            "--json", help="One JSON object per input even on a terminal.")] = False,
        quiet: options.Quiet = False):
    """Describe record streams or index folders. Reads each stream to the end to count rows
    (Arrow files and Parquet answer from their footers). Prints a table on a terminal and one
    JSON object per input otherwise.

    \b
    Example:
      vecpipe info corpus.jsonl
      vecpipe embed docs.jsonl | vecpipe info
      vecpipe info idx/
    """
    from vecpipe.cli import console

    for path in inputs or ["-"]:
        facts = describe_index(path) if os.path.isdir(path) else describe_stream(path,
                                                                                  input_format)
        if as_json or not console.stdout_is_terminal():
            print(json.dumps(facts, ensure_ascii=False), flush=True)
        else:
            print_table(facts)


def describe_index(path: str) -> dict:
    from vecpipe.formats.index_store import read_manifest

    manifest = read_manifest(path)
    files = {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))
             if os.path.isfile(os.path.join(path, name))}
    return {"path": path, "format": "vecpipe-index", "bytes": sum(files.values()),
            "files": files, "manifest": manifest}


def describe_stream(path: str, input_format: str = "auto") -> dict:
    from vecpipe.formats import schema as names
    from vecpipe.formats.readers import STDIN_NAME, RecordStream

    stream = RecordStream([path], input_format)
    rows = sum(item.batch.num_rows for item in stream)
    schema = stream.schema
    name = STDIN_NAME if path == "-" else path
    facts = {"path": name, "format": stream.formats.get(name, "empty"), "rows": rows,
             "bytes": os.path.getsize(path) if path != "-" else None,
             "columns": {f.name: str(f.type) for f in schema} if schema is not None else {},
             "metadata": names.read_meta(schema)}
    if "codec" in facts["metadata"]:
        facts["metadata"]["codec"] = codec_summary(facts["metadata"]["codec"])
    return facts


def codec_summary(codec_json: str) -> dict:
    """The codec in a few words: a PCA codec carries hundreds of KB of projection."""
    import hashlib

    from vecpipe.formats.codec import Codec

    codec = Codec.from_json(codec_json)
    summary = {"transform": codec.describe(), "to": codec.to,
               "sha256": hashlib.sha256(codec_json.encode()).hexdigest()[:16]}
    pca = json.loads(codec_json).get("pca")
    if pca:
        summary["pca_sha256"] = pca.get("sha256")
    return summary


def print_table(facts: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=facts["path"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in facts.items():
        if key == "path":
            continue
        if isinstance(value, dict):
            text = "\n".join(f"{k}: {v if not isinstance(v, dict) else json.dumps(v)}"
                             for k, v in value.items()) or "-"
        else:
            text = "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key, text)
    Console().print(table)
