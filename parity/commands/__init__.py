"""Commands: one module per CLI command, called by the command line and the Python API."""
