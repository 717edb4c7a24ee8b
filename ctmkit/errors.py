"""User-facing errors: the CLI turns a UserError into one line on stderr and exit status 2."""


_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(text: object) -> str:
    """`text` on one line: line breaks (e.g. inside a file name or a YAML value) are shown escaped."""
    return str(text).translate(_BREAKS)


class UserError(Exception):
    """A problem the user can fix (bad path, bad shape, bad value). The message says how, on one line."""

    def __init__(self, message: object = "", *args) -> None:
        super().__init__(one_line(message), *args)
