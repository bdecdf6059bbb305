"""How a stage process ends, as its supervisor reads it.

A stage whose settings cannot work (a port taken, a bad flag, a model path that is no
model) prints one line saying why and exits with :data:`EXIT_CONFIG`: restarting it
would fail the same way, so ``stagemesh up`` ends with that line while it starts, and
systemd units list the code in ``RestartPreventExitStatus=``. Any other exit (a crash,
an engine that died) is worth a restart.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: argparse's exit code for a bad flag.
EXIT_USAGE = 2
#: sysexits.h's EX_CONFIG: the settings cannot work.
EXIT_CONFIG = 78
#: Exit codes a restart cannot mend.
FINAL_EXIT_CODES = frozenset({EXIT_USAGE, EXIT_CONFIG})
#: How every one-line reason of a stage begins (``stagemesh decode: ...``), argparse's too.
REASON_PREFIX = "stagemesh "
#: Longest reason shown; the log keeps the whole line.
_REASON_CHARS = 400


class StartFailed(Exception):
    """A mesh being started cannot come up (a port taken, a stage that cannot start, a
    start-up deadline passed): ``stagemesh up`` stops what it started and prints the
    message, one line, then ``detail`` (a log's tail) when there is one."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def run_main(main: Callable[[], None], prog: str) -> None:
    """Run a stage's entry point; a ``SystemExit`` with a message (a setting that cannot
    work, raised anywhere during start) ends the process with ``prog: message`` on
    stderr and :data:`EXIT_CONFIG`."""
    try:
        main()
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        print(f"{prog}: {exc.code}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None


def reason_line(log_tail: str) -> str:
    """The one-line reason in the tail of a stage's log: its last line in the
    ``stagemesh <stage>: ...`` form, else its last line."""
    lines = [line for line in log_tail.splitlines() if line.strip()]
    found = next(
        (line for line in reversed(lines) if line.startswith(REASON_PREFIX)),
        lines[-1] if lines else "",
    )
    if len(found) > _REASON_CHARS:  # vLLM lists every architecture it knows, for one it does not
        found = found[:_REASON_CHARS] + "... (the whole line is in its log)"
    return found or "(its log is empty)"
