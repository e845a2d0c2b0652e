"""User-facing errors and the one place that turns them into a one-line message.

A `UserError` means the input was wrong (a path, a flag, a config, a file), not the code:
command-line entry points print its message on one line, with no traceback, and exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user. The message says what went wrong and what to do, in one line."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None) -> int:
    """Runs `main(argv)`; a `UserError` (or a vqvae input error) becomes `error: ...` and exit 2."""
    from vqvae.errors import VQVAEInputError  # the leaf package's own user-error type

    try:
        return int(main(argv) or 0)
    except (UserError, VQVAEInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
