"""Serve a profiled store over the Open Inference Protocol from Python (what `memadapt serve`
does), e.g. to embed the server in your own launcher:

    python examples/server.py --store demo-store --budget 600MiB --floor resnet18=0.9

Then any KServe v2 client talks to it, e.g. ``tritonclient.http.InferenceServerClient(
"127.0.0.1:8000")``; see ``memadapt serve --help`` for every option.
"""

from __future__ import annotations

import argparse

from adaptive.serve import ServeConfig, serve


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--budget", default=None, help="e.g. 600MiB, cgroup or cuda-free")
    ap.add_argument("--floor", action="append", default=[], metavar="MODEL=ACC")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    floors = {m or "*": float(a) for m, _, a in (f.rpartition("=") for f in args.floor)}
    serve(ServeConfig(args.store, budget=args.budget, floors=floors, port=args.port))


if __name__ == "__main__":
    main()
