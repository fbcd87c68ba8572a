"""``ember store ...``: the weight store, worked on directly in ``--home`` (no server needed).

    ember store ls                         the stored models: tier, size, sha256; each tier's budget
    ember store import SOURCE --out FILE   convert a .safetensors/.pt/.bin file or HF folder to a checkpoint
    ember store import SOURCE --key K      ... or into the home's store as K (name@version; weights only,
                                           `ember deploy` is what registers a model)
    ember store import ... --compress      ... compressed (the cool tier; kept only if 5% smaller in the store)
    ember store verify [KEY|FILE]          check every chunk's crc32 (all models when none is named)
    ember store export KEY|FILE --out F    write a checkpoint back out as safetensors
    ember store bench                      the load benchmark (benchmarks/load.py) on a temporary checkpoint;
                                           saves this host's link speeds to HOME/bandwidths.json for `serve`

Errors print ``error: <what to do>`` and exit 1, as the rest of the CLI does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ember.cli.common import DEFAULT_HOME, HomeOption, console, err_console, fail, print_table, size_text
from ember.errors import EmberError
from ember.store import Store

__all__ = ["store_app"]

store_app = typer.Typer(
    name="store", help="Inspect, import, verify and benchmark the weight store.", no_args_is_help=True
)


@contextlib.contextmanager
def _store(home: Path) -> Iterator[Store]:
    try:
        store = Store(home.expanduser() / "store")
    except OSError as exc:
        fail(f"cannot open the store under {home}: {exc}")
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except EmberError as exc:
        fail(exc.message)
    except FileNotFoundError as exc:
        fail(f"{exc.filename} does not exist; check the path")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        fail(str(exc).strip("'\""))


@store_app.command("ls")
def list_stored(home: HomeOption = DEFAULT_HOME) -> None:
    """List the models in the store with their tier and size, and each tier's budget."""
    with _errors(), _store(home) as opened:
        table = Table("model", "tier", "size", "compressed", "assets", "sha256")
        keys = opened.keys()
        for key in keys:
            model = opened.get(key)
            ratio = "-" if model.raw_bytes is None else f"{model.raw_bytes / model.bytes:.2f}x"
            table.add_row(
                key,
                str(opened.tier(key)),
                size_text(model.bytes),
                ratio,
                str(len(model.assets)),
                model.sha256[:12],
            )
        print_table(table)
        stats = opened.statistics()
        for name, tier in (("warm", stats.warm), ("cool", stats.cool)):
            budget = "unlimited" if tier.budget_bytes is None else size_text(tier.budget_bytes)
            console.print(f"{name}: {tier.models} models, {size_text(tier.bytes)} of {budget}")


@store_app.command("import")
def import_weights(
    source: Annotated[Path, typer.Argument(help="A .safetensors, .pt/.bin/.pth file, or a (HF) folder of them.")],
    out: Annotated[Path | None, typer.Option(help="Write the checkpoint to this file.")] = None,
    key: Annotated[str | None, typer.Option(help="Import into the home's store as this name@version.")] = None,
    compress: Annotated[
        bool, typer.Option(help="Store the weights compressed (byte planes + zstd); pays when disk reads are slow.")
    ] = False,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Convert weights into Ember's checkpoint format: to a file (--out) or into the store (--key)."""
    from ember.store import import_source
    from ember.store.store import WEIGHTS

    if (out is None) == (key is None):
        fail("give exactly one of --out FILE or --key name@version")
    with _errors():
        if out is not None:
            size = import_source(source, out, compress=compress)
            console.print(f"wrote {out}: {size_text(size)}")
            return
        assert key is not None
        with _store(home) as opened:
            staging = opened.staging(key)
            try:
                import_source(source, staging / WEIGHTS)
                model = opened.commit(key, staging, compress=compress)
            except BaseException:
                opened.abort(staging)
                raise
            packed = "" if model.raw_bytes is None else f" (compressed {model.raw_bytes / model.bytes:.2f}x)"
            console.print(f"stored {model.key}: {size_text(model.bytes)} in the cool tier{packed}")


@store_app.command("verify")
def verify(
    target: Annotated[
        str | None, typer.Argument(help="A model key, or a checkpoint file; all models if absent.")
    ] = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Check every chunk's crc32 (and the assets' sha256) of one model, a file, or every stored model."""
    from ember.store.store import check_file

    with _errors():
        if target is not None and Path(target).is_file():
            check_file(Path(target))
            console.print(f"{target}: ok")
            return
        with _store(home) as opened:
            keys = [target] if target is not None else opened.keys()
            damaged = []
            for key in keys:
                try:
                    opened.verify(key)
                    console.print(f"{key}: ok")
                except EmberError as exc:
                    damaged.append(key)
                    err_console.print(Text(f"{key}: {exc.message}", style="red"))
            if damaged:
                raise typer.Exit(1)


@store_app.command("export")
def export(
    target: Annotated[str, typer.Argument(help="A model key or a checkpoint file.")],
    out: Annotated[Path, typer.Option(help="The safetensors file to write.")],
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Write a stored model (or a checkpoint file) out as safetensors."""
    from ember.store import export_safetensors

    with _errors():
        if Path(target).is_file():
            size = export_safetensors(Path(target), out)
        else:
            with _store(home) as opened:
                size = export_safetensors(opened.weights_path(target), out)
        console.print(f"wrote {out}: {size_text(size)}")


@store_app.command("bench")
def bench(
    size_gb: Annotated[float, typer.Option(min=0.001, help="Checkpoint size in GB.")] = 1.0,
    repeat: Annotated[int, typer.Option(min=1, help="Rounds; each method's best counts.")] = 3,
    threads: Annotated[int, typer.Option(min=1, help="Reader threads.")] = 4,
    cold: Annotated[bool, typer.Option(help="Also measure from cold disk (evicting the page cache).")] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the rows here.")] = None,
    save: Annotated[
        bool, typer.Option(help="Save the measured link speeds to HOME/bandwidths.json, which `ember serve` reads.")
    ] = True,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Measure Ember's loader beside torch.load, safetensors and the raw link (benchmarks/load.py).

    The checkpoint is written under HOME, on the disk that holds the store's cool tier. Unless
    --no-save, the store's promotion and the warm tier's load rates go to HOME/bandwidths.json:
    `ember serve` predicts a model's first load with them (docs/operations.md).
    """
    from ember.bench.load import format_table, run_benchmark
    from ember.clock import WallClock
    from ember.store.bandwidths import BANDWIDTHS_FILE, measured_bandwidths, save_bandwidths

    with _errors():
        where = home.expanduser()
        where.mkdir(parents=True, exist_ok=True)
        rows, notes = run_benchmark(size_gb, repeat, threads, cold, workdir=where, say=console.print)
        console.print(format_table(rows), highlight=False)
        console.print(json.dumps(notes), highlight=False)
        if json_path is not None:
            json_path.write_text(json.dumps({"rows": [r.to_json() for r in rows], "notes": notes}, indent=2) + "\n")
        if not save:
            return
        bandwidths, sources = measured_bandwidths(rows, bool(notes.get("cuda")))
        facts = {**notes, "size_gb": size_gb, "repeat": repeat}
        save_bandwidths(where / BANDWIDTHS_FILE, bandwidths, sources, facts, WallClock().wall())
        console.print(
            f"saved {where / BANDWIDTHS_FILE}: cool->warm {bandwidths.disk_bytes_per_s / 1e9:.2f} GB/s "
            f"({sources['disk_bytes_per_s']['source']}), warm->hot {bandwidths.host_to_device_bytes_per_s / 1e9:.2f} "
            f"GB/s ({sources['host_to_device_bytes_per_s']['source']}); `ember serve` predicts first loads with them",
            highlight=False,
        )
