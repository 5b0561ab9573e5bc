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
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        verify: Annotated[bool, typer.Option(
            "--verify", help="Instead: check every file of the INPUT index folders (a linked "
                             "index's shards too) against the manifest's sizes and sha256 "
                             "checksums; exit 1 naming the first damaged file, else one OK "
                             "line per index on stderr.")] = False,
        quiet: options.Quiet = False):
    """Describe record streams or index folders. Reads each stream to the end to count rows
    (Arrow files and Parquet answer from their footers). Prints a table on a terminal and one
    JSON object per input otherwise (--output-format table|jsonl|json).

    \b
    Example:
      vecpipe info corpus.jsonl
      vecpipe embed docs.jsonl | vecpipe info
      vecpipe info idx/
      vecpipe info --verify idx/   # exit 1 if a file does not match its checksum
    """
    from vecpipe.formats.writers import print_report_records, resolve_report_format

    report_format = resolve_report_format(output_format)
    if verify:
        verify_indexes(inputs or [])
        return
    described = []
    for path in inputs or ["-"]:
        facts = describe_index(path) if os.path.isdir(path) else describe_stream(path,
                                                                                  input_format)
        if report_format == "table":
            print_table(facts)
        elif report_format == "jsonl":
            print_report_records([facts], "jsonl")
        else:
            described.append(facts)
    if report_format == "json":
        print_report_records(described, "json")


def verify_indexes(paths) -> None:
    from vecpipe.cli import console
    from vecpipe.formats.errors import UsageError
    from vecpipe.core.index_open import verify_index

    if not paths:
        raise UsageError("--verify needs the index folders to check")
    for path in paths:
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"--verify checks index folders; {path} is not one")
        checked = verify_index(path)
        console.info(f"{path}: OK, {checked} files match their checksums")


def describe_index(path: str) -> dict:
    from vecpipe.core.index_format import layout_of, read_manifest

    manifest = read_manifest(path)
    files = {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))
             if os.path.isfile(os.path.join(path, name))}
    return {"path": path, "format": "vecpipe-index", "layout": layout_of(manifest),
            "bytes": sum(files.values()), "files": files, "manifest": manifest}


def describe_stream(path: str, input_format: str = "auto") -> dict:
    from vecpipe.formats import schema as names
    from vecpipe.formats.readers import STDIN_NAME, RecordStream

    stream = RecordStream([path], input_format)
    rows = sum(item.batch.num_rows for item in stream)
    schema = stream.widest_schema or stream.schema  # a JSONL field typed late counts
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

    from vecpipe.core.codec import Codec

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
            text = "\n".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}"
                             for k, v in value.items()) or "-"
        else:
            text = "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key, text)
    Console().print(table)
