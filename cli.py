"""Command-line helpers every stage shares: --help shows each default, and a number out of range
is refused in one line that gives the range."""
import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every default; required flags say so."""

    def _get_help_string(self, action):
        if action.required and action.option_strings:
            return f"{action.help or ''} (required)"
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help or ''} (default: %(default)s)"


def bounded(kind, low, high=None):
    """argparse type: a number of `kind` in [low, high], else a message with the range."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range [{low}, {'inf' if high is None else high}]")
        return value
    return parse
