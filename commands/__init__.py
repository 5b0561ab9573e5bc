"""One module per subcommand; each has a thin `run()` and pure functions that do the work."""
