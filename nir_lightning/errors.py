"""Errors whose message is written for the user: ``nir`` prints them without a traceback.

Each message names the file, option or value at fault, the problem, and how to fix it.
"""

from __future__ import annotations


class NIRError(Exception):
    """Base class of the errors ``nir`` reports as ``nir: error: <message>``."""


class InputError(NIRError, ValueError):
    """A user-supplied file, value or option is unusable; the message says what and how to fix it.

    Core classes do not know where a value came from (a config file, the command line, Python),
    so they name the parameter as ``Owner.param`` at the start of the message and pass
    ``owner``/``param``/``value``; the CLI layer replaces that prefix with the config key it
    came from (``model.field2.init_args.step_size``), see :meth:`located`.

    >>> e = InputError("Sampler.stride must be >= 1, got 0", owner="Sampler", param="stride", value=0)
    >>> str(e.located("model.sampler.init_args.stride"))
    'model.sampler.init_args.stride must be >= 1, got 0'
    """

    def __init__(self, message: str, *, owner: str | None = None, param: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.owner = owner
        self.param = param
        self.value = value

    def located(self, key: str) -> InputError:
        """The same error with its ``Owner.param`` prefix replaced by the config ``key``."""
        message = str(self)
        prefix = f"{self.owner}.{self.param}"
        message = key + message[len(prefix):] if message.startswith(prefix) else f"{key}: {message}"
        return InputError(message, owner=self.owner, param=self.param, value=self.value)


class OutputError(NIRError, OSError):
    """An output could not be written (disk full, no permission); earlier files are left intact."""
