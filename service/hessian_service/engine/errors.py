"""Engine exceptions: every one names the offending field so callers can report it."""

from __future__ import annotations

ECHO_LIMIT = 200  # characters of an echoed input value kept in an error message


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` (input echoed in a message) cut to `limit` characters, noting its full length.

    An unbounded echo can push a status message past gRPC's metadata limit.
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _rebuilt(cls: type[EngineError], args: tuple, state: dict) -> EngineError:
    """An engine error unpickled: its message and attributes, without calling its __init__
    (whose arguments are not its `args`)."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    def __reduce__(self) -> tuple:
        """Pickle by message and attributes: a run's worker process sends its errors back."""
        return _rebuilt, (type(self), self.args, self.__dict__)


class ValidationError(EngineError, ValueError):
    """Bad input: `field` names what was wrong, the message says what was expected."""

    def __init__(self, field: str, expected: str, got: object | None = None) -> None:
        self.field = field
        self.expected = expected
        message = f"{clip(field)}: expected {expected}"  # a field can hold a name sent to us
        if got is not None:
            message += f", got {clip(str(got))}"
        super().__init__(message)

    def renamed(self, field: str) -> ValidationError:
        """The same error reported under another field path (e.g. the wire's)."""
        out = ValidationError(field, self.expected)
        out.args = (clip(field) + str(self)[len(clip(self.field)) :],)
        return out


class EvaluationError(ValidationError):
    """The objective raised while evaluating at given params (an exported program's node):
    INVALID_ARGUMENT for a call, but a line-search or trust-region trial there is rejected."""


class UnknownNameError(ValidationError):
    """A name (objective, method, step policy, backend) that is not in its catalogue."""

    def __init__(self, field: str, name: str, known: list[str]) -> None:
        super().__init__(field, f"one of {sorted(known)}", repr(name))


class ResourceLimitError(EngineError):
    """A request that would exceed a configured limit (memory budget, size); refused up front."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def renamed(self, field: str) -> ResourceLimitError:
        """The same refusal reported under another field path (e.g. the wire's)."""
        return ResourceLimitError(field, self.message)


class UnavailableError(EngineError):
    """A capability the caller asked for by name is not available in this build or device."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")
