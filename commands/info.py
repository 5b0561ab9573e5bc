"""Show what a stream, index or TREC file holds: kind, format, rows, columns, metadata, size."""
import json
import os
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options


def run(inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Record files, index folders, TREC runs or qrels files, or - for stdin (the "
                 "default).", show_default=False, metavar="INPUT")] = None,
        input_format: options.InputFormat = "auto",
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        verify: Annotated[bool, typer.Option(
            "--verify", help="Instead: check every file of the INPUT index folders (a linked "
                             "index's shards too) against the manifest's sizes and sha256 "
                             "checksums; exit 1 naming the first damaged file, else one OK "
                             "line per index on stderr.")] = False,
        fields: options.FieldsFlag = False,
        field_names: options.alias(bool, "--field-names", "--fields", "fields") = False,
        quiet: options.Quiet = False):
    """Describe record streams, index folders, model folders, TREC runs and qrels files. Every
    kind reports path, kind (records|index|model|trec-run|qrels), format, rows, bytes, columns
    and metadata; an index adds its layout, files and manifest, a model its files and how
    vecpipe made it (`train`'s recipe: data fingerprint, loss, hyperparameters, base model,
    loss and evaluation curves; `merge --models`' record), a TREC run its queries, hits per
    query and depth, a qrels file its queries, judgments, relevant documents per query and
    grades.
    Reads each input to the end to count rows (an index answers from its manifest). A named
    file that is not JSONL/Arrow/Parquet is read as a TREC run (`qid Q0 docid rank score
    tag`) or qrels (`qid 0 docid rel`, or BEIR's TSV); a .csv/.tsv name is read as CSV/TSV
    records (a .tsv of BEIR qrels as qrels); stdin is read as records. Prints a table on a
    terminal and one JSON object per input otherwise (--output-format
    table|jsonl|json|csv|tsv: csv/tsv a header and a line per input, nested values as JSON).
    --fields instead lists the field names (as `xsv headers`): a stream's columns, an index's
    stored fields, a TREC file's columns; one per line, or with their types in a table on a
    terminal (and with --output-format table).

    \b
    Example:
      vecpipe info corpus.jsonl
      vecpipe embed docs.jsonl | vecpipe info
      vecpipe info idx/
      vecpipe info model/   # how `vecpipe train` made it
      vecpipe info run.trec qrels/test.tsv
      vecpipe info --fields corpus.parquet
      vecpipe info --verify idx/   # exit 1 if a file does not match its checksum
    """
    from vecpipe.formats.errors import UsageError
    from vecpipe.formats.writers import print_report_records, resolve_report_format

    report_format = resolve_report_format(output_format)
    if verify and fields:
        raise UsageError("--verify and --fields do not combine: choose one")
    if verify:
        verify_indexes(inputs or [])
        return
    described = []
    for path in inputs or ["-"]:
        facts = describe(path, input_format)
        if fields and report_format == "table":
            print_fields_table(facts)
        elif fields:
            for name in facts["columns"]:
                print(name, flush=True)
        elif report_format == "table":
            print_table(facts)
        elif report_format == "jsonl":
            print_report_records([facts], "jsonl")
        else:
            described.append(facts)
    if described:  # json, csv, tsv: every input in one report
        print_report_records(described, report_format)


def describe(path: str, input_format: str = "auto") -> dict:
    """The facts of one input, whatever its kind."""
    from vecpipe.formats.readers import named_format

    if os.path.isdir(path) and is_model_folder(path):
        return describe_model(path)
    if os.path.isdir(path):
        return describe_index(path)
    kind, fmt = trec_kind(path) if input_format == "auto" and path != "-" else (None, None)
    named = named_format(path) if path != "-" else None
    if named == "csv" or (named == "tsv" and not (fmt or "").startswith("beir-tsv")):
        kind = None  # records named so; a .tsv of qrels is BEIR's format
    if kind == "trec-run":
        return describe_run(path, fmt)
    if kind == "qrels":
        return describe_qrels(path, fmt)
    return describe_stream(path, input_format)


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
    from vecpipe.core.index_format import ROWS, layout_of, read_manifest

    manifest = read_manifest(path)
    files = {}
    for folder, subfolders, names in os.walk(path):
        subfolders.sort()
        for name in sorted(names):
            full = os.path.join(folder, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    metadata = readable_meta(dict(manifest.get("metadata") or {}))
    rows_file = os.path.join(path, ROWS)
    if layout_of(manifest) == "linked" and manifest.get("shards"):
        rows_file = os.path.join(path, manifest["shards"][0]["path"], ROWS)
    types = _parquet_types(rows_file)
    summary = {key: value for key, value in manifest.items() if key not in ("metadata", "files")}
    return {"path": path, "kind": "index", "format": "vecpipe-index",
            "rows": manifest["count"], "bytes": sum(files.values()),
            "columns": {name: types.get(name) for name in manifest["fields"]},
            "metadata": metadata, "layout": layout_of(manifest), "files": files,
            "manifest": summary}


MODEL_MARKERS = ("modules.json", "config_sentence_transformers.json")


def is_model_folder(path: str) -> bool:
    """A sentence-transformers model folder (trained, merged or downloaded), not an index."""
    return any(os.path.isfile(os.path.join(path, name)) for name in MODEL_MARKERS)


def describe_model(path: str) -> dict:
    """A model folder: its files, and how vecpipe made it (the train recipe, the merge
    record) when it did."""
    from vecpipe.core.model_soup import PROVENANCE_FILE
    from vecpipe.core.training import read_recipe

    files = {}
    for folder, subfolders, names in os.walk(path):
        subfolders.sort()
        for name in sorted(names):
            full = os.path.join(folder, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    facts = {"path": path, "kind": "model", "format": "sentence-transformers", "rows": None,
             "bytes": sum(files.values()), "columns": {}, "metadata": {}, "files": files}
    recipe = read_recipe(path)
    if recipe is not None:
        facts["recipe"] = recipe
    merged = os.path.join(path, PROVENANCE_FILE)
    if os.path.isfile(merged):
        with open(merged, encoding="utf-8") as f:
            facts["merge"] = json.load(f)
    return facts


def _parquet_types(path: str) -> dict:
    """{field: type} from a Parquet footer; {} when the file is absent or unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return {f.name: str(f.type) for f in pq.read_schema(path)}
    except (OSError, pa.ArrowException):
        return {}


def describe_stream(path: str, input_format: str = "auto") -> dict:
    from vecpipe.formats import schema as names
    from vecpipe.formats.readers import STDIN_NAME, RecordStream

    stream = RecordStream([path], input_format)
    rows = sum(item.batch.num_rows for item in stream)
    schema = stream.widest_schema or stream.schema  # a JSONL field typed late counts
    name = STDIN_NAME if path == "-" else path
    facts = {"path": name, "kind": "records", "format": stream.formats.get(name, "empty"),
             "rows": rows, "bytes": os.path.getsize(path) if path != "-" else None,
             "columns": {f.name: str(f.type) for f in schema} if schema is not None else {},
             "metadata": readable_meta(names.read_meta(schema))}
    return facts


# trec_eval's names for the columns of a run and of qrels; BEIR's for its qrels TSV
RUN_COLUMNS = {"query_id": "string", "iter": "string", "docno": "string", "rank": "int64",
               "sim": "double", "run_id": "string"}
QRELS_COLUMNS = {"query_id": "string", "iter": "string", "docno": "string", "rel": "int64"}
BEIR_QRELS_COLUMNS = {"query-id": "string", "corpus-id": "string", "score": "int64"}


def trec_kind(path: str) -> tuple:
    """(kind, format) of a file that is no record format (as eval tells them apart: the first
    bytes), by the shape of its first line: ("trec-run", "trec"), ("qrels", "trec") or
    ("qrels", "beir-tsv"), "+gzip"/"+zstd" when compressed; (None, None) otherwise (read it
    as records)."""
    from vecpipe.formats.errors import DataError
    from vecpipe.formats.readers import open_input, sniff

    stream, head, compression = open_input(path)
    suffix = f"+{compression}" if compression else ""
    try:
        try:
            if sniff(head) is not None or not head.strip():
                return None, None
        except DataError:
            pass  # not a record format
        first = _first_line(stream)
    finally:
        stream.close()
    if first is None:
        return None, None
    tsv = [field.strip() for field in first.split("\t")]
    if len(tsv) == 3 and (tsv[2].lstrip("-").isdigit() or
                          [f.lower() for f in tsv] == list(BEIR_QRELS_COLUMNS)):
        return "qrels", "beir-tsv" + suffix  # read_qrels' rule: tab-separated triples
    if len(first.split()) == 6:
        return "trec-run", "trec" + suffix
    if len(first.split()) == 4:
        return "qrels", "trec" + suffix
    return None, None


def _first_line(stream) -> Optional[str]:
    for raw in stream:
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
        if line:
            return line
    return None


def _spread(counts: list) -> dict:
    import statistics

    if not counts:
        return {"min": 0, "median": 0, "max": 0}
    median = statistics.median(counts)
    return {"min": min(counts), "median": int(median) if median == int(median) else median,
            "max": max(counts)}


def _text_file_facts(path: str, kind: str, fmt: str, columns: dict, rows: int) -> dict:
    return {"path": path, "kind": kind, "format": fmt, "rows": rows,
            "bytes": os.path.getsize(path), "columns": columns, "metadata": {}}


def describe_run(path: str, fmt: str = "trec") -> dict:
    from vecpipe.formats.trec import read_run

    run = read_run(path)
    hits = [len(docs) for docs in run.values()]
    facts = _text_file_facts(path, "trec-run", fmt, dict(RUN_COLUMNS), sum(hits))
    facts.update(queries=len(run), hits=sum(hits), hits_per_query=_spread(hits),
                 depth=max(hits, default=0))
    return facts


def describe_qrels(path: str, fmt: str = "trec") -> dict:
    from vecpipe.formats.trec import read_qrels

    judged = read_qrels(path)
    qrels = judged.qrels
    judgments = sum(len(docs) for docs in qrels.values())
    grades: dict = {}
    for docs in qrels.values():
        for rel in docs.values():
            grades[rel] = grades.get(rel, 0) + 1
    columns = BEIR_QRELS_COLUMNS if fmt.startswith("beir-tsv") else QRELS_COLUMNS
    facts = _text_file_facts(path, "qrels", fmt, dict(columns), judgments + judged.duplicates)
    facts.update(queries=len(qrels), judgments=judgments, duplicates=judged.duplicates,
                 relevant_per_query=_spread([sum(rel > 0 for rel in docs.values())
                                             for docs in qrels.values()]),
                 grades={str(grade): grades[grade] for grade in sorted(grades)})
    return facts


def readable_meta(meta: dict) -> dict:
    """`meta` with its JSON values shown as objects: the codec summed up, the text embedded
    (fields, separator, chunking) as it is recorded."""
    from vecpipe.core.space import TEXT_KEY, parse_embedded_text

    if "codec" in meta:
        meta["codec"] = codec_summary(meta["codec"])
    if meta.get(TEXT_KEY) and parse_embedded_text(meta[TEXT_KEY]) is not None:
        meta[TEXT_KEY] = parse_embedded_text(meta[TEXT_KEY])
    return meta


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


def print_fields_table(facts: dict) -> None:
    """The fields of one input and their types, for people."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=facts["path"], title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("type")
    for name, kind in facts["columns"].items():
        table.add_row(name, "-" if kind is None else str(kind))
    Console().print(table)


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
