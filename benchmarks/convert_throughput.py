"""Conversion throughput and peak memory on a synthetic Amazon-2018-style file (a million review lines by default).

Writes a reviews file in the 2018 schema (each line with a ~300-character review text, as the real files) and its
metadata, converts it with ``python -m recbole_uip convert amazon2018`` in a child process, and reports lines per
second and the child's peak RSS (``getrusage`` of the waited-for child), at two sizes so that the memory per
interaction can be read off. The conversion is one Python process on one thread.

    python benchmarks/convert_throughput.py                      # 1,000,000 lines (and 250,000)
    python benchmarks/convert_throughput.py --lines=200000 --k_core=5 --gzip=true
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recbole_uip.benchmarking import benchmark_parser, cpu_model, publish_result

WORDS = ("game fun great story control graphics music level boss friend price gift play hours love hate buy "
         "worth recommend broken disc case player online multiplayer campaign").split()


def write_synthetic(folder: Path, lines: int, users: int, items: int, gz: bool, seed: int = 0) -> tuple[Path, Path]:
    """A reviews file of ``lines`` lines over ``users`` x ``items`` (item popularity skewed) and metadata for every
    item, in the 2018 schema."""
    rng = random.Random(seed)
    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8", compresslevel=1)) if gz else \
        (lambda p: open(p, "w", encoding="utf-8"))
    suffix = ".json.gz" if gz else ".json"
    reviews, meta = folder / f"Synthetic{suffix}", folder / f"meta_Synthetic{suffix}"
    texts = [" ".join(rng.choice(WORDS) for _ in range(55)) for _ in range(64)]
    with opener(reviews) as handle:
        for n in range(lines):
            item = int(items * rng.random() ** 3)          # skewed popularity over every item
            handle.write(json.dumps({
                "overall": float(rng.randint(1, 5)), "verified": True, "reviewTime": "09 13, 2009",
                "reviewerID": f"A{rng.randrange(users):013d}", "asin": f"B{item:09d}", "reviewerName": "Someone",
                "reviewText": texts[n % 64], "summary": "Five Stars", "unixReviewTime": 1_252_800_000 + n}) + "\n")
    with opener(meta) as handle:
        for item in range(items):
            handle.write(json.dumps({
                "category": ["Video Games", "PC", f"Genre {item % 40}"], "description": [texts[item % 64]],
                "title": f"Game &amp; Title {item}", "brand": f"Studio {item % 300}", "also_buy": [], "rank": "",
                "main_cat": "Video Games", "price": "$19.99", "asin": f"B{item:09d}", "imageURL": []}) + "\n")
    return reviews, meta


def measure(reviews: Path, meta: Path, out: Path, k_core: int) -> dict:
    """Convert in a child; its wall time and peak RSS (KiB, from the grandparent's ``RUSAGE_CHILDREN``)."""
    command = [sys.executable, "-m", "recbole_uip", "convert", "amazon2018", f"--input={reviews}", f"--meta={meta}",
               f"--output_dir={out}", "--name=Amazon_Synthetic", f"--k_core={k_core}", "--progress=false"]
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             f"r = subprocess.run({command!r}, capture_output=True, text=True); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
             "sys.stderr.write(r.stdout + r.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    seconds, rss_kib, code = done.stdout.split()
    if code != "0":
        raise SystemExit(f"conversion failed:\n{done.stderr}")
    report = json.loads((out / "Amazon_Synthetic.convert.json").read_text())
    return {"seconds": round(float(seconds), 2), "peak_rss_mib": round(int(rss_kib) / 1024, 1),
            "interactions_written": report["interactions"], "users": report["users"], "items": report["items"]}


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--name", default="convert_throughput", help="the result's file name under results/convert/")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--k_core", type=int, default=0)
    parser.add_argument("--gzip", type=lambda s: s.lower() == "true", default=False)
    args = parser.parse_args(argv)
    sizes = sorted({max(args.lines // 4, 1), args.lines})
    rows = []
    with tempfile.TemporaryDirectory(prefix="uip-convert-bench-") as tmp:
        for lines in sizes:
            folder = Path(tmp) / str(lines)
            folder.mkdir()
            start = time.perf_counter()
            reviews, meta = write_synthetic(folder, lines, args.users, args.items, args.gzip)
            generated = time.perf_counter() - start
            result = measure(reviews, meta, folder / "out", args.k_core)
            result.update(lines=lines, input_mib=round(reviews.stat().st_size / 2**20, 1),
                          lines_per_second=round(lines / result["seconds"]), generate_seconds=round(generated, 1))
            rows.append(result)
            print(result, flush=True)
    per_interaction = ((rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]) * 2**20
                       / max(rows[-1]["lines"] - rows[0]["lines"], 1)) if len(rows) > 1 else float("nan")
    record = {"command": ["benchmarks/convert_throughput.py"] + [a for a in (argv or sys.argv[1:])],
              "date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cpu_count": len(os.sched_getaffinity(0)),
              "threads": 1, "python": platform.python_version(),
              "settings": {"users": args.users, "items": args.items, "k_core": args.k_core, "gzip": args.gzip,
                           "review_text_chars": 300}}
    data = {"record": record, "runs": rows, "bytes_per_extra_line": round(per_interaction, 1)}
    table = ["| lines | input (MiB) | written interactions | users | items | seconds | lines/s | peak RSS (MiB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['lines']:,} | {r['input_mib']} | {r['interactions_written']:,} | {r['users']:,} | {r['items']:,} | "
              f"{r['seconds']} | {r['lines_per_second']:,} | {r['peak_rss_mib']} |" for r in rows]
    markdown = "\n".join([
        "# Conversion throughput: synthetic Amazon 2018 reviews", "",
        "`python -m recbole_uip convert amazon2018` on a synthetic reviews file in the 2018 schema (each line with a "
        "300-character review text) plus metadata for every item; one process, one thread; peak RSS of the converting "
        "process (getrusage of the waited-for child, Python and numpy imports included).", "",
        *table, "",
        f"Memory grows with the interactions and the distinct ids, not with the text: between the two sizes, "
        f"{rows[-1]['lines'] - rows[0]['lines']:,} more lines and {rows[-1]['users'] - rows[0]['users']:,} more "
        f"distinct users cost {rows[-1]['peak_rss_mib'] - rows[0]['peak_rss_mib']:.1f} MiB of peak RSS, about "
        f"{per_interaction:.0f} bytes per extra line (20 bytes of arrays per interaction plus the id dictionaries; "
        f"review text is never kept).", "",
        f"- command: `python {' '.join(record['command'])}`",
        f"- date {record['date']}; CPU {record['cpu']} ({record['cpu_count']} cores visible), 1 thread, Python "
        f"{record['python']}; settings {record['settings']}",
    ])
    publish_result(Path(args.results) / "convert", args.name, data, markdown)


if __name__ == "__main__":
    main()
