"""Write a benchmark folder's records joined with their scores as one gzipped JSON-lines file (one row
per image; no images), small enough to keep in git as the raw data behind a table in RESULTS.md.

    python benchmarks/export_bench.py runs/shapes-final benchmarks/data/shapes-final.jsonl.gz

Read it back with `pandas.read_json(path, lines=True)` or `attnreg.eval.stats.paired_comparison`.
"""

import argparse
import gzip
import json
from pathlib import Path

from attnreg.eval.io import iter_records
from attnreg.eval.metrics import load_scores

KEEP = ("key", "dataset", "subset", "prompt", "targets", "seed", "noise_seed", "method", "config", "config_hash", "seconds",
        "peak_memory_bytes", "device", "process", "processes", "time", "run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("dest")
    a = ap.parse_args()
    scores = load_scores(Path(a.folder))
    rows = 0
    Path(a.dest).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(a.dest, "wt") as f:
        for r in iter_records(Path(a.folder)):
            row = {k: r.get(k) for k in KEEP}
            for metric, data in sorted(scores.items()):
                for field, v in (data["items"].get(r["key"]) or {}).items():
                    row[f"{metric}.{field}"] = v
            f.write(json.dumps(row, sort_keys=True) + "\n")
            rows += 1
    print(f"{rows} rows -> {a.dest}")


if __name__ == "__main__":
    main()
