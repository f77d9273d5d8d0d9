"""The one exception type users see: a message that names what was wrong and what was expected."""


class MoePruneError(Exception):
    """Bad input or an impossible request. The CLI prints the message without a traceback."""
