"""``python -m virtlet.console RAW CRI STATE``: run one console log writer until SIGTERM (debugging, tests)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from virtlet.console.writer import POLL_INTERVAL, ConsoleLogWriter


def main(argv: list[str] | None = None) -> int:
    """``python -m virtlet.console RAW CRI STATE``: run one writer until SIGTERM (debugging, tests)."""
    ap = argparse.ArgumentParser(prog="python -m virtlet.console", description=main.__doc__)
    ap.add_argument("raw", type=Path)
    ap.add_argument("cri", type=Path)
    ap.add_argument("state", type=Path)
    ap.add_argument("--poll-interval", type=float, default=POLL_INTERVAL, help="without inotify (--no-inotify)")
    ap.add_argument("--no-inotify", action="store_true", help="poll RAW instead of waking on its changes")
    ap.add_argument("--no-fsync", action="store_true", help="skip fsync (a process crash is still safe)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    w = ConsoleLogWriter(args.raw, args.cri, args.state, poll_interval=args.poll_interval,
                         durable=not args.no_fsync, inotify=not args.no_inotify)
    w.start()
    print("ready", flush=True)
    done.wait()
    w.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
