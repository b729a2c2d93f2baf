"""The one kind of error a user's flags, values or files cause in the tools: one line on stderr, exit 2."""

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad flag, value, file, interface or filter given by the user: one line, exit EXIT_USAGE."""
