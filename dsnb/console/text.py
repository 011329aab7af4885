r"""Text from jobs made safe to print on a terminal.

A job's output is the user's code's, or a model's: it may hold escape sequences that move the
cursor, clear the screen, set the window title, or write the clipboard (OSC 52), and rich lets ESC
through. Lines printed by dsnb's console keep their text and lose every control sequence.

Example:
    >>> printable("step 1\x1b[2J\x1b]52;c;aGk=\x07 loss\x1b[31m 2.0\x1b[0m\r")
    'step 1 loss 2.0'
"""

from __future__ import annotations

import re

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), other ESC sequences, then C0/C1 controls but tab.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` without escape sequences and control characters (tabs kept)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))
