"""Exit codes a shell user can act on, and the error that carries one out of a command."""

from __future__ import annotations

OK = 0
FAILED = 1  # the server failed (5xx, 1011) or something unexpected happened
USAGE = 2  # bad arguments (argparse's own code)
UNREACHABLE = 3  # no server at the URL (refused, DNS, timeout)
REFUSED_AUTH = 4  # 401/403, or a WebSocket closed 4001/4004: check --token
BAD_INPUT = 5  # the server refused the input (4xx other than auth: bad file, too long, no speech...)
NOT_FOUND = 6  # the file to read does not exist or cannot be read
TRY_LATER = 75  # busy: 429/503, or the stream closed 1013 (EX_TEMPFAIL): run it again later

EXIT_CODES_HELP = """exit codes:
  0   done
  1   the server failed (5xx) or an unexpected error
  2   bad arguments
  3   no server at the URL
  4   refused: check --token (401/403, or the stream closed 4001/4004)
  5   the server refused the input (4xx: bad file, too long, no speech...)
  6   the input file cannot be read
  75  the server is busy (429/503, or the stream closed 1013): try again later"""


class CliError(Exception):
    """A failure with a message for the user and the exit code it maps to."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


def code_for_status(status: int) -> int:
    if status in (401, 403):
        return REFUSED_AUTH
    if status in (429, 503):
        return TRY_LATER
    if 400 <= status < 500:
        return BAD_INPUT
    return FAILED


def code_for_close(close_code: int | None) -> int:
    """A WebSocket close code (None: the connection dropped without one) as an exit code."""
    if close_code in (1000, 1001):
        return OK
    if close_code in (4001, 4004):
        return REFUSED_AUTH
    if close_code == 1013:
        return TRY_LATER
    if close_code in (1008, 1009):
        return BAD_INPUT
    return FAILED
