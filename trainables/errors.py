"""The project's own exceptions, kept free of imports so any module can raise them.

Two kinds, because a user fixes them differently:
- `ConfigError`: bad input (a config field, a flag, a file). The message is one line naming the
  field and what is allowed; the CLI prints it and exits 2.
- `ServiceUnavailable`: the input may be right but a service it names (an MLflow tracking
  server) did not answer. The CLI prints it the same way, so scripts see the same exit code.
"""


class ConfigError(ValueError):
    """Bad user input: the message is one line naming the field and what is allowed."""


class CliError(ConfigError):
    """A bad command line (as opposed to a bad config); also exits 2."""


class ServiceUnavailable(ConnectionError):
    """A service named by the input (a tracking server) could not be reached."""


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """An error (or any text) as one line: libraries' messages (pyarrow, MLflow, torchvision)
    span many, and ours must stay one line wherever they are quoted."""
    text = " ".join(str(err).split())
    if not text and isinstance(err, BaseException):
        text = type(err).__name__
    return text[:limit]
