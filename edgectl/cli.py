"""The ``edgectl`` command line: thin commands over the library."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler

from edgectl import __version__
from edgectl.errors import EdgectlError

if TYPE_CHECKING:
    from edgectl.storage import Store

app = typer.Typer(
    help="Keep IoT telemetry in sync between edge sites and a cloud, "
    "driven by YAML rule chains.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_USER_ERROR = 1
EXIT_BUG = 3
EXIT_INTERRUPT = 130


def setup_logging(verbose: bool) -> None:
    """Install one handler on the ``edgectl`` logger: rich on a terminal, and
    one plain line per record otherwise, so log files stay greppable."""
    root = logging.getLogger("edgectl")
    root.handlers.clear()
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    level = logging.DEBUG if verbose else logging.WARNING
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(level)


def fail(message: str) -> NoReturn:
    """Print a user-fixable error and exit 1."""
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(EXIT_USER_ERROR)


def print_json(data: Any) -> None:
    """Print data as JSON on stdout, for scripts."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        out.print(f"edgectl {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log per-message detail.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """Keep IoT telemetry in sync between edge sites and a cloud."""
    setup_logging(verbose)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Chain files to check.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print problems as JSON.")
    ] = False,
    strict: Annotated[bool, typer.Option(help="Fail on warnings too.")] = False,
) -> None:
    """Check rule chain files: schema, then relations, cycles and reachability."""
    from edgectl.checks import validate_file

    problems = [problem for path in files for problem in validate_file(path)]
    if as_json:
        print_json([problem.as_dict() for problem in problems])
    else:
        for problem in problems:
            style = "red" if problem.is_error else "yellow"
            out.print(problem.render(), style=style, markup=False)
    failed = any(p.is_error or strict for p in problems)
    if not as_json and not failed:
        out.print(f"{len(files)} file(s) valid", style="green")
    raise typer.Exit(EXIT_USER_ERROR if failed else 0)


DbOption = Annotated[
    Path | None, typer.Option("--db", help="A stopped role's DuckDB file.")
]
UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="A running role, e.g. http://127.0.0.1:8081."),
]


def _one_target(db: Path | None, url: str | None) -> None:
    if (db is None) == (url is None):
        fail(
            "give exactly one of --db PATH (a stopped file) "
            "or --url URL (a running role)"
        )


def open_store(db: Path | None, *, create: bool = False) -> Store:
    """Open a stopped role's file; only ``create`` allows a new one."""
    from edgectl.storage import Store

    if db is None:
        fail("give --db PATH (a stopped file) or --url URL (a running role)")
    if not create and not db.exists():
        fail(f"{db} does not exist; give the --db of an edge or cloud")
    return Store(db)


@app.command()
def run(
    role: Annotated[str, typer.Option(help="edge or cloud.")] = "edge",
    config: Annotated[Path | None, typer.Option(help="YAML file of settings.")] = None,
    db: Annotated[Path | None, typer.Option(help="DuckDB file.")] = None,
    chain: Annotated[Path | None, typer.Option(help="Root chain file.")] = None,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT (port 0: any free).")
    ] = None,
    cloud: Annotated[str | None, typer.Option(help="Edge: the cloud's URL.")] = None,
    edge_key: Annotated[
        str | None, typer.Option(help="Edge: its key on the cloud.")
    ] = None,
    edge_secret: Annotated[
        str | None, typer.Option(help="Edge: its secret (prefer EDGECTL_EDGE_SECRET).")
    ] = None,
    cloud_ca: Annotated[
        Path | None, typer.Option(help="Edge: CA file to trust.")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this cert.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Key of --tls-cert.")] = None,
    port_file: Annotated[
        Path | None, typer.Option(help="Write the bound port here.")
    ] = None,
) -> None:
    """Run an edge or a cloud until SIGTERM or Ctrl-C."""
    from edgectl.config import load_config
    from edgectl.roles import run_role

    options = {
        "db": db,
        "chain": chain,
        "listen": listen,
        "cloud": cloud,
        "edge_key": edge_key,
        "edge_secret": edge_secret,
        "cloud_ca": cloud_ca,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "port_file": port_file,
    }
    run_role(load_config(role, config, options))


devices_app = typer.Typer(help="Devices registered on an edge.", no_args_is_help=True)
edges_app = typer.Typer(help="Edges registered on a cloud.", no_args_is_help=True)
attributes_app = typer.Typer(help="Attributes of devices.", no_args_is_help=True)
inspect_app = typer.Typer(help="Look inside a role's file.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(edges_app, name="edges")
app.add_typer(attributes_app, name="attributes")
app.add_typer(inspect_app, name="inspect")


@devices_app.command("add")
def devices_add(
    name: str,
    type: Annotated[str, typer.Option("--type", help="Device type.")] = "default",
    token: Annotated[
        str | None, typer.Option(help="Access token (random if absent).")
    ] = None,
    db: DbOption = None,
    url: UrlOption = None,
) -> None:
    """Register a device on an edge and print its access token."""
    from edgectl import remote
    from edgectl.devices import register_device

    _one_target(db, url)
    if url:
        body = {"name": name, "type": type, "token": token}
        answer = remote.call(url, "POST", "/api/edgectl/devices", body)
        device_token, created = answer["token"], answer["created"]
    else:
        store = open_store(db, create=True)
        try:
            device, created = register_device(store, name, type=type, token=token)
        finally:
            store.close()
        device_token = device.token
    if not created:
        err.print(f"device {name!r} already exists; its token:")
    out.print(device_token)


@edges_app.command("add")
def edges_add(
    name: str,
    key: Annotated[
        str | None, typer.Option(help="Routing key (random if absent).")
    ] = None,
    secret: Annotated[
        str | None, typer.Option(help="Secret (random if absent).")
    ] = None,
    db: DbOption = None,
    url: UrlOption = None,
) -> None:
    """Register an edge on a cloud and print its key and secret."""
    from edgectl import remote
    from edgectl.devices import register_edge

    _one_target(db, url)
    if url:
        answer = remote.call(
            url,
            "POST",
            "/api/edgectl/edges",
            {"name": name, "key": key, "secret": secret},
        )
        edge_key, edge_secret, created = (
            answer["key"],
            answer["secret"],
            answer["created"],
        )
    else:
        store = open_store(db, create=True)
        try:
            edge, created = register_edge(store, name, key=key, secret=secret)
        finally:
            store.close()
        edge_key, edge_secret = edge.routing_key, edge.secret
    if not created:
        err.print(f"edge {name!r} already exists; its credentials:")
    out.print(f"key: {edge_key}\nsecret: {edge_secret}")


@attributes_app.command("set")
def attributes_set(
    device: str,
    pairs: Annotated[
        list[str], typer.Argument(help="KEY=VALUE; VALUE is JSON or text.")
    ],
    url: Annotated[str, typer.Option(help="The running cloud.")],
    scope: Annotated[str, typer.Option(help="shared or server.")] = "shared",
) -> None:
    """Set attributes on the cloud; shared ones reach the device's edge."""
    from edgectl import remote
    from edgectl.message import normalize_scope, thingsboard_scope
    from edgectl.values import JsonSyntaxError, parse_json

    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            fail(f"expected KEY=VALUE, got {pair!r}")
        try:
            values[key] = parse_json(raw)
        except JsonSyntaxError:
            values[key] = raw
    name = normalize_scope(scope)
    if name not in ("shared", "server"):
        fail(f"--scope must be shared or server, got {scope!r}")
    path = (
        f"/api/plugins/telemetry/DEVICE/{device}/attributes/{thingsboard_scope(name)}"
    )
    remote.call(url, "POST", path, values)
    out.print(f"set {len(values)} {name} attribute(s) on {device}")


@inspect_app.command("tables")
def inspect_tables(
    table: Annotated[str | None, typer.Argument(help="Show this table's rows.")] = None,
    db: DbOption = None,
    url: UrlOption = None,
    device: Annotated[str | None, typer.Option(help="Only this device.")] = None,
    key: Annotated[str | None, typer.Option(help="Only this key.")] = None,
    scope: Annotated[str | None, typer.Option(help="Attributes of this scope.")] = None,
    since: Annotated[int | None, typer.Option(help="From this epoch ms.")] = None,
    until: Annotated[int | None, typer.Option(help="Up to this epoch ms.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what a file stores and what is still queued, or one table's rows."""
    from edgectl import remote, render
    from edgectl.journal import unstored_count
    from edgectl.tables import RowFilter, overview, rows

    _one_target(db, url)
    where = RowFilter(device, key, scope, since, until, limit)
    if url:
        path = "/api/edgectl/tables" + (f"/{table}" if table else "")
        params = {k: v for k, v in vars_of(where).items() if v is not None}
        data = remote.call(url, "GET", path, params=params if table else None)
    else:
        store = open_store(db)
        try:
            data = (
                rows(store, table, where)
                if table
                else overview(store, unstored_count(store))
            )
        finally:
            store.close()
    if as_json:
        print_json(data)
    elif table:
        render.rows(out, table, data)
    else:
        render.overview(out, data)


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="CSV-like file of readings.")],
    url: UrlOption = None,
    db: DbOption = None,
    chain: Annotated[
        Path | None, typer.Option(help="With --db: the edge's chain.")
    ] = None,
    mapping: Annotated[Path | None, typer.Option(help="Mapping YAML.")] = None,
    separator: Annotated[str | None, typer.Option(help="',', ';', tab, space.")] = None,
    decimal_comma: Annotated[bool | None, typer.Option(help="2,5 means 2.5.")] = None,
    header: Annotated[
        bool | None, typer.Option(help="First line names columns.")
    ] = None,
    columns: Annotated[str | None, typer.Option(help="Names, comma-separated.")] = None,
    timestamp_column: Annotated[
        list[str] | None, typer.Option(help="Repeatable.")
    ] = None,
    timestamp_format: Annotated[
        str | None, typer.Option(help="strptime format, epoch_ms or epoch_s.")
    ] = None,
    timezone: Annotated[
        str | None, typer.Option(help="IANA zone of wall times.")
    ] = None,
    device_column: Annotated[
        str | None, typer.Option(help="One device per value.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Device name (default: file stem).")
    ] = None,
    device_prefix: Annotated[
        str | None, typer.Option(help="Prefix of device names.")
    ] = None,
    device_type: Annotated[
        str | None, typer.Option(help="Type of new devices.")
    ] = None,
    skip_column: Annotated[list[str] | None, typer.Option(help="Repeatable.")] = None,
    missing: Annotated[
        list[str] | None, typer.Option(help="Sentinel; repeatable.")
    ] = None,
    token: Annotated[str | None, typer.Option(help="One device's token.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per request.")] = 500,
    dry_run: Annotated[bool, typer.Option(help="Read and count only.")] = False,
) -> None:
    """Backfill readings from a CSV file into an edge, with a progress bar."""
    from edgectl import ingest as library
    from edgectl.render import ingest_summary, progress_bar

    given = {
        "separator": library.parse_separator(separator) if separator else None,
        "decimal_comma": decimal_comma,
        "has_header": header,
        "columns": tuple(columns.split(",")) if columns else None,
        "timestamp_columns": tuple(timestamp_column) if timestamp_column else None,
        "timestamp_format": timestamp_format,
        "timezone": timezone,
        "device_column": device_column,
        "device_name": device,
        "device_prefix": device_prefix,
        "device_type": device_type,
        "skip_columns": tuple(skip_column) if skip_column else None,
        "missing_values": tuple(missing) if missing else None,
    }
    rules = library.build_mapping(file, mapping, given)
    if not dry_run:
        _one_target(db, url)
    with progress_bar(err, f"ingesting {file.name}") as advance:
        if dry_run:
            summary = library.summarize_file(file, rules, progress=advance)
        elif url:
            token_for = (lambda _device: token) if token else None
            summary = library.ingest_http(
                file,
                rules,
                url=url,
                token_for=token_for,
                batch_size=batch_size,
                progress=advance,
            )
        else:
            summary = _ingest_db(library, file, rules, db, chain, advance)
    ingest_summary(out, summary)


def _ingest_db(
    library: Any, file: Path, rules: Any, db: Any, chain: Any, advance: Any
) -> Any:
    from edgectl.checks import load_chain
    from edgectl.engine import BuildContext, Engine
    from edgectl.roles import example_chain

    chain_path = chain or example_chain("edge")
    engine = Engine(load_chain(chain_path), BuildContext(load_chain))
    store = open_store(db, create=True)
    try:
        return library.ingest_store(
            file, rules, store=store, engine=engine, progress=advance
        )
    finally:
        engine.close()
        store.close()


replay_app = typer.Typer(
    help="Queued and dead-lettered events: list, re-queue, purge.", no_args_is_help=True
)
app.add_typer(replay_app, name="replay")


def _selection(**fields: Any) -> Any:
    from edgectl.replay import Selection

    return Selection(**{k: v for k, v in fields.items() if v is not None})


QueueOption = Annotated[
    str | None, typer.Option(help="cloud_event (edge) or edge_event (cloud).")
]
FirstOption = Annotated[int | None, typer.Option(help="From this sequence.")]
LastOption = Annotated[int | None, typer.Option(help="Up to this sequence.")]
DeviceOption = Annotated[str | None, typer.Option(help="Only this device.")]
ActionOption = Annotated[str | None, typer.Option(help="Only this action.")]
EdgeOption = Annotated[str | None, typer.Option(help="Cloud: only this edge.")]
SinceOption = Annotated[int | None, typer.Option(help="Queued from this epoch ms.")]
UntilOption = Annotated[int | None, typer.Option(help="Queued up to this epoch ms.")]


def _replay(
    action: str, db: Path | None, url: str | None, selection: Any, dry_run: bool
) -> Any:
    from edgectl import remote, replay

    _one_target(db, url)
    if url:
        body = {**vars_of(selection), "dry_run": dry_run}
        return remote.call(url, "POST", f"/api/edgectl/replay/{action}", body)
    store = open_store(db)
    try:
        if action == "list":
            return replay.list_events(store, selection)
        operations = {
            "requeue": replay.requeue_dead,
            "purge": replay.purge,
            "resend": replay.resend,
        }
        operation = operations[action]
        return {
            "count": operation(store, selection, dry_run=dry_run),
            "dry_run": dry_run,
        }
    finally:
        store.close()


def _print_count(answer: dict[str, Any], verb: str) -> None:
    would = "would " if answer["dry_run"] else ""
    out.print(f"{would}{verb}: {answer['count']} event(s)")


@replay_app.command("list")
def replay_list(
    db: DbOption = None,
    url: UrlOption = None,
    queue: QueueOption = None,
    dead: Annotated[
        bool, typer.Option(help="Dead letters instead of pending.")
    ] = False,
    delivered: Annotated[
        bool, typer.Option(help="Delivered events kept for resend.")
    ] = False,
    first: FirstOption = None,
    last: LastOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    device: DeviceOption = None,
    action: ActionOption = None,
    edge: EdgeOption = None,
    limit: Annotated[int, typer.Option()] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List pending (or dead-lettered) events by sequence, time, device, action."""
    from edgectl import render

    state = "dead" if dead else "delivered" if delivered else "pending"
    selection = _selection(
        queue=queue,
        state=state,
        first=first,
        last=last,
        since=since,
        until=until,
        device=device,
        action=action,
        edge=edge,
        limit=limit,
    )
    found = _replay("list", db, url, selection, False)
    print_json(found) if as_json else render.rows(out, "events", found)


@replay_app.command("requeue")
def replay_requeue(
    db: DbOption = None,
    url: UrlOption = None,
    queue: QueueOption = None,
    first: FirstOption = None,
    last: LastOption = None,
    device: DeviceOption = None,
    action: ActionOption = None,
    edge: EdgeOption = None,
    dry_run: Annotated[bool, typer.Option(help="Count only.")] = False,
) -> None:
    """Put dead letters back in the queue (after fixing what refused them)."""
    selection = _selection(
        queue=queue,
        state="dead",
        first=first,
        last=last,
        device=device,
        action=action,
        edge=edge,
    )
    _print_count(_replay("requeue", db, url, selection, dry_run), "re-queue")


@replay_app.command("purge")
def replay_purge(
    db: DbOption = None,
    url: UrlOption = None,
    queue: QueueOption = None,
    dead: Annotated[bool, typer.Option(help="Purge dead letters.")] = False,
    first: FirstOption = None,
    last: LastOption = None,
    device: DeviceOption = None,
    action: ActionOption = None,
    edge: EdgeOption = None,
    dry_run: Annotated[bool, typer.Option(help="Count only.")] = False,
) -> None:
    """Delete dead letters, or drop pending events up to --last (never sent)."""
    selection = _selection(
        queue=queue,
        state="dead" if dead else "pending",
        first=first,
        last=last,
        device=device,
        action=action,
        edge=edge,
    )
    _print_count(_replay("purge", db, url, selection, dry_run), "purge")


@replay_app.command("resend")
def replay_resend(
    first: Annotated[int, typer.Option(help="Send again from this sequence on.")],
    db: DbOption = None,
    url: UrlOption = None,
    queue: QueueOption = None,
    edge: EdgeOption = None,
    dry_run: Annotated[bool, typer.Option(help="Count only.")] = False,
) -> None:
    """Send delivered events again (kept with keep_delivered_seconds); safe,
    since the peer applies each event once."""
    selection = _selection(queue=queue, state="delivered", first=first, edge=edge)
    _print_count(_replay("resend", db, url, selection, dry_run), "send again")


@app.command()
def demo(
    folder: Annotated[
        Path | None,
        typer.Option("--dir", help="Keep the files here (default: a temp folder)."),
    ] = None,
    seconds: Annotated[float, typer.Option(help="How long devices post.")] = 20.0,
    devices: Annotated[int, typer.Option(help="Simulated devices.")] = 3,
    rate: Annotated[float, typer.Option(help="Posts per second, all devices.")] = 20.0,
    outage: Annotated[
        float, typer.Option(help="Stop the cloud this long mid-run.")
    ] = 0.0,
) -> None:
    """Run a cloud and an edge on loopback with simulated devices, then compare."""
    import tempfile

    from edgectl.demo import Demo
    from edgectl.render import demo_summary, live_demo

    target = folder or Path(tempfile.mkdtemp(prefix="edgectl-demo-"))
    with live_demo(out) as show:
        comparison = Demo(
            target,
            devices=devices,
            seconds=seconds,
            rate=rate,
            outage=outage,
            on_tick=show,
        ).run()
    demo_summary(out, comparison)
    raise typer.Exit(0 if comparison.matches else EXIT_USER_ERROR)


import_app = typer.Typer(
    help="Import rule chains from other platforms.", no_args_is_help=True
)
export_app = typer.Typer(
    help="Export rule chains to other platforms.", no_args_is_help=True
)
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")


@import_app.command("thingsboard")
def import_thingsboard(
    file: Annotated[Path, typer.Argument(help="ThingsBoard rule chain JSON export.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="YAML file to write.")
    ] = None,
    allow_unsupported: Annotated[
        bool,
        typer.Option(
            "--allow-unsupported",
            help="Write placeholders for nodes edgectl cannot run.",
        ),
    ] = False,
) -> None:
    """Turn a ThingsBoard rule chain export into an edgectl YAML chain."""
    from edgectl.thingsboard import import_file

    result = import_file(file, allow_unsupported=allow_unsupported)
    for node in result.unsupported:
        err.print(f"placeholder: {node.describe()}", style="yellow", markup=False)
    for warning in result.warnings:
        err.print(f"warning: {warning}", style="yellow", markup=False)
    if output is None:
        sys.stdout.write(result.yaml)
    else:
        output.write_text(result.yaml, encoding="utf-8")
        out.print(f"wrote {output} ({len(result.document['nodes'])} nodes)")


@export_app.command("thingsboard")
def export_thingsboard(
    chain_file: Annotated[Path, typer.Argument(help="edgectl chain YAML file.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="JSON file to write.")
    ] = None,
) -> None:
    """Write a chain as JSON that ThingsBoard's rule chain import accepts."""
    from edgectl.thingsboard import export_file

    text = export_file(chain_file)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        out.print(f"wrote {output}")


def vars_of(value: Any) -> dict[str, Any]:
    """The fields of a dataclass as a dict."""
    import dataclasses

    return dataclasses.asdict(value)


def main() -> None:
    """Entry point: run the app with one error boundary and the exit codes."""
    try:
        code = app(standalone_mode=False)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except EdgectlError as error:
        err.print(f"error: {error}", markup=False)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPT)
    except Exception as error:
        # typer raises its own copy of click's exceptions; both are accepted.
        kinds = {kind.__name__ for kind in type(error).__mro__}
        if "ClickException" in kinds:
            error.show()  # type: ignore[attr-defined]
            sys.exit(error.exit_code)  # type: ignore[attr-defined]
        if "Abort" in kinds:
            sys.exit(EXIT_INTERRUPT)
        err.print("edgectl hit a bug; please report it with this traceback:")
        err.print_exception()
        sys.exit(EXIT_BUG)
    sys.exit(code if isinstance(code, int) else 0)
