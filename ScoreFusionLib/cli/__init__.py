"""The ``scorefusion`` command line; each sub-command lives in its own ``*_cmd`` module."""
