"""User-facing errors: the CLI turns a UserError into one line on stderr and exit status 2."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad shape, bad value). The message says how."""
