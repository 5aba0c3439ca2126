"""The ``osq`` command line: a thin Typer layer over ``osqdeploy``.

It parses arguments, calls the library and prints with rich; the only state it owns is the
workspace (``.osq/`` in the current directory, see :mod:`cli.workspace`) that lets
``osq calibrate``, ``osq export`` and ``osq eval`` chain without repeating paths.
"""
