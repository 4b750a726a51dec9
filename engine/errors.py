"""The errors a user acts on.

A `CollapseError` says, in one line, what is wrong, where (the file, the field) and
what to do; the CLI prints it so and exits with its `exit_code` (2: bad input; 1: a
chain that stopped). Any other exception is a bug in the engine (or a library), and the
CLI shows its traceback (exit 1) rather than hide it behind a one-line message.
"""
from __future__ import annotations


class CollapseError(Exception):
    exit_code = 2

    def __str__(self) -> str:  # the message alone (KeyError's str() would quote it)
        return str(self.args[0]) if self.args else self.__class__.__name__


class SpecError(CollapseError, ValueError):
    """A study file problem, already phrased as the one line the user sees."""


class BadInput(CollapseError, ValueError):
    """A value the user gave (a study field, a table's metric, data) that cannot be used."""


class NotFound(CollapseError, FileNotFoundError):
    """A file or directory the user named that is not there."""


class UnknownName(CollapseError, KeyError):
    """A name the user gave (a family, a strategy, a metric) that the engine does not know."""


class Unreachable(CollapseError, ConnectionError):
    """A Ray cluster or job server that does not answer at the address given."""


def collapse_error_in(e: BaseException) -> "CollapseError | None":
    """The CollapseError behind an exception that carried it through Ray (a task's
    RayTaskError, Ray Data's UserCodeException), if there is one."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, CollapseError):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None
