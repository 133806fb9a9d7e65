"""Errors the CLI turns into one clear message and a non-zero exit (never a traceback)."""

from __future__ import annotations


class B2txtError(Exception):
    """A problem the user can fix: bad input, bad config, missing file."""

    exit_code = 2


class ConfigError(B2txtError):
    """The configuration file or an override is invalid."""


class DownloadError(B2txtError):
    """A download problem: network, HTTP status, digest, disk, archive or an unknown file."""


class DvcError(B2txtError):
    """A ``dvc`` command failed, is not installed, or the directory is not in a DVC repository."""


class DataError(B2txtError):
    """A data file does not follow the Dryad layout; ``problems`` lists every finding."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        text = message
        if self.problems:
            shown = self.problems[:50]
            text += "\n" + "\n".join(f"  - {p}" for p in shown)
            if len(self.problems) > len(shown):
                text += f"\n  ... and {len(self.problems) - len(shown)} more"
        super().__init__(text)


class UnknownWordsError(B2txtError):
    """Words that the pronunciation lexicon does not know."""

    def __init__(self, words: list[str], context: str = ""):
        self.words = sorted(set(words))
        where = f" in {context}" if context else ""
        super().__init__(
            f"{len(self.words)} word(s){where} have no pronunciation in the lexicon: "
            + ", ".join(self.words[:40])
            + (" ..." if len(self.words) > 40 else "")
        )
