"""Errors the SDK raises to plugin authors. Every one derives from `um.PluginError`.

The worker runtime reports them to the core as `"Type: text"` strings, so messages are written
for a person reading a server log: what is wrong, where, and how to fix it.
"""


class PluginError(Exception):
    """Base of every error the UniModel SDK raises about a plugin."""


class PluginNotFoundError(PluginError):
    """The plugin file, directory or named class does not exist."""


class InvalidModelError(PluginError):
    """A `um.Model` subclass declares something the runtime cannot serve.

    The message lists every problem found in the class, one per line, each with its fix.
    """

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems
