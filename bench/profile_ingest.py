"""Profile ``breastcad serve`` while it receives an ingest set (py-spy, sampling the live
process): writes a collapsed-stack file and prints the top frames by own and total samples.

    python bench/profile_ingest.py [-n 300] [--out bench/results/ingest-profile.txt]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, busi_images, node  # noqa: E402
from ingest import Receiver, send, write_set  # noqa: E402


def summarise(collapsed: Path, top: int = 25) -> str:
    """Top functions by inclusive samples (a frame counted once per stack) from py-spy's raw
    (collapsed) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} samples", "inclusive:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    lines.append("own:")
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest-profile.txt")
    parser.add_argument("--idle", action="store_true", help="sample waiting threads too")
    args = parser.parse_args()
    images = busi_images(args.n)
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        work = Path(tmp)
        with node(work / "node", series_quiet_seconds=3600) as handle:
            assert handle.serve.process is not None
            write_set(work / "set", images)
            files = sorted((work / "set").glob("*.dcm"))
            raw = work / "profile.raw"
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                 str(handle.serve.process.pid), "--format", "raw", "--threads",
                 *(["--idle"] if args.idle else []),
                 "--rate", "100", "-o", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            time.sleep(1.5)
            seconds = send(Receiver("breastcad", handle.dicom_port, "BREASTCAD", lambda: 0), files)
            spy.send_signal(2)
            spy.wait(60)
            print(f"{args.n} instances in {seconds:.2f} s")
            summary = summarise(raw)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(summary + "\n")
            (args.out.with_suffix(".collapsed")).write_text(raw.read_text())
            print(summary)


if __name__ == "__main__":
    main()
