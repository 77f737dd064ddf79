"""`portcullis up` with tracemalloc on, for finding what grows in the gateway (the soak's
SOAK_TRACEMALLOC=FRAMES): `python -m bench.traced_up DIR SNAPSHOTS` runs `portcullis up
--dir DIR`; each SIGUSR2 writes a snapshot to SNAPSHOTS/snapshot-N.pickle (N from 1),
then an empty SNAPSHOTS/snapshot-N.done once the file is complete."""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

from portcullis.cli.main import main


def run(directory: str, snapshots: Path) -> None:
    tracemalloc.start(int(os.environ.get("TRACEMALLOC_FRAMES", "10")))
    taken = 0

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        tracemalloc.take_snapshot().dump(str(snapshots / f"snapshot-{taken}.pickle"))
        (snapshots / f"snapshot-{taken}.done").touch()

    signal.signal(signal.SIGUSR2, dump)
    main(["up", "--dir", directory], prog_name="portcullis")


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]))
