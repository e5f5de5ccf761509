"""importer: the worker that fills one volume from a source and exits (CDI's cdi-importer)."""
