"""The ``arqc`` commands, one module each (analyze, compile, certify, train, report), and the options they
share (options.py). Each parses its options, calls the Python API or the driver, and prints; arqc/cli.py
assembles them into the command group."""
