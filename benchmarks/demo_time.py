"""Time ``make demo`` on a fresh clone (nothing installed, a new venv), as a newcomer runs it.

Writes ``results/demo.json``: the wall time, the exit status and the last lines of output.

Run:  python benchmarks/demo_time.py            (clones this repository's HEAD into a temp dir)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(HERE.parent))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memadapt-demo-") as tmp:
        clone = Path(tmp) / "memadapt"
        subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, check=True,
                              capture_output=True, text=True).stdout.strip()
        t0 = time.perf_counter()
        # one stream, in the order it was written: the tail is the demo's last lines
        proc = subprocess.run(["make", "demo"], cwd=clone, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
    out = proc.stdout.splitlines()
    report = {"command": "make demo (fresh clone, new venv)", "commit": head,
              "returncode": proc.returncode, "wall_s": round(wall, 1),
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "tail": out[-24:]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"make demo: {wall:.0f} s, exit {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
