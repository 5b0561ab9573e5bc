"""The vecpipe library: the embedder and its runtimes, the vector space and codecs, exact top-k,
the index engine, filters, IR metrics and vector statistics, mining, merging and model soups.

Never imports typer or vecpipe.cli; numpy, pyarrow, usearch and torch are imported by the
functions that need them, so importing this package alone stays cheap.
"""
