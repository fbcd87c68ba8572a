"""Weight loading: Ember's loader beside torch.load, safetensors and the raw link, in one run.

    python benchmarks/load.py [--size-gb 1.0] [--repeat 3] [--threads 4] [--no-cold] [--sweep]
                              [--no-compressed | --compressed-only] [--json out.json]

Claim (issue 3): Ember loads at >= 90% of the raw link measured in the same run, and >= 2.5x
``safetensors.torch.load_file`` from the page cache. The methods, the "loaded" rule (every page
resident and read) and the sources are described in ``ember.bench.load``; ``ember store bench``
runs the same code.

Then the compressed tier (``ember.bench.compress``): compression ratio per dtype on real
MiniLM weights, trained-like and random ones (zstd over the whole file beside it); compressed
against uncompressed loads from the page cache and cold disk, per decompression thread count; and
``Store.promote`` of each from cold disk. The notes say, per source, whether compression paid and
whether ``compression_pays`` predicted it from the measured rates.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ember.bench.compress import format_ratios, run_compress_benchmark
from ember.bench.load import format_table, run_benchmark
from ember.store.loader import LoaderConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size (default 1.0 on CPU hosts)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best time of each method counts")
    parser.add_argument("--threads", type=int, default=4, help="reader threads (ceiling and Ember)")
    parser.add_argument("--chunk-mib", type=int, default=16, help="Ember's read size in MiB")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-disk runs")
    parser.add_argument("--sweep", action="store_true", help="also time reads per thread count and chunk size")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-compressed", action="store_true", help="skip the compressed tier's rows")
    which.add_argument("--compressed-only", action="store_true", help="only the compressed tier's rows")
    args = parser.parse_args(argv)
    loader = LoaderConfig(threads=args.threads, chunk_bytes=args.chunk_mib << 20)
    rows, notes, ratios = [], {}, []
    if not args.compressed_only:
        rows, notes = run_benchmark(
            args.size_gb, args.repeat, args.threads, not args.no_cold, args.workdir, loader, sweep=args.sweep
        )
        print(format_table(rows))
        print(json.dumps(notes))
    if not args.no_compressed:
        packed_rows, ratios, packed_notes = run_compress_benchmark(
            args.size_gb, args.repeat, args.threads, not args.no_cold, args.workdir
        )
        print(format_ratios(ratios))
        print(format_table(packed_rows))
        print(json.dumps(packed_notes))
        rows += [replace(r, source=f"compressed tier: {r.source}") for r in packed_rows]
        notes["compressed"] = packed_notes
    if args.json:
        body = {"rows": [r.to_json() for r in rows], "ratios": [r.to_json() for r in ratios], "notes": notes}
        args.json.write_text(json.dumps(body, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
