"""Record streams: sniffing, readers, writers, schema names and metadata.

Never imports typer or torch; pyarrow is imported by the modules that need it, so importing
this package alone stays cheap.
"""
