"""Bytes <-> Arrow: readers, writers, JSONL, schema names and metadata, shard and part files,
and the plain files vecpipe reads (TREC runs and qrels, BEIR folders).

Never imports typer or torch; pyarrow is imported by the modules that need it, so importing
this package alone stays cheap.
"""

__version__ = "0.1.0"  # here, at the bottom of the imports, so every layer can record it
