"""The one exception type that reaches the user.

Anything raised as ``ArqcError`` is printed by the CLI as a single line on stderr
(``arqc: error: <message>``) and the process exits with status 2. The message says
what was wrong and what to do about it.
"""


class ArqcError(Exception):
    """A user-facing error with a one-line message that names the problem and the remedy."""
