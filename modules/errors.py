"""The one exception type for problems the user can fix."""


class UserError(Exception):
    """A problem with the user's config, data, flags or files.

    The entry script prints its message as a single line on stderr (no traceback)
    and exits with status 2. Messages say what is wrong, where (file, line, key),
    and how to fix it.
    """


def one_line(exc: BaseException) -> str:
    """An exception's message with its whitespace and line breaks collapsed, for one-line errors."""
    return " ".join(str(exc).split())
