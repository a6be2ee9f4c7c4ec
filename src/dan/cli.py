"""The ``dan`` command: parse arguments, build services, call one method, print."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pydantic import SecretStr

from dan import __version__
from dan.config import Settings
from dan.domain import Account, ModelKind
from dan.errors import DanError

log = logging.getLogger("dan")

# (flag, settings field, help) for the options `dan serve` and `dan worker` share.
COMMON_OPTIONS: list[tuple[str, str, str]] = [
    ("--models-dir", "models_dir", "folder with checkpoints/, loras/, controlnet/, upscalers/"),
    ("--data-dir", "data_dir", "folder for the database, results and caches"),
    ("--database-url", "database_url", "SQLAlchemy URL (default: SQLite in the data dir)"),
    ("--device", "device", "torch device: auto, cpu, cuda, cuda:1, ..."),
    ("--dtype", "dtype", "auto, float32, float16 or bfloat16"),
]
A1111_OPTIONS: list[tuple[str, str, str]] = [
    ("--a1111-url", "a1111_url", "with --backend a1111: the instance's URL"),
    ("--a1111-user", "a1111_user", "with --backend a1111: the user of its --api-auth"),
    (
        "--a1111-password",
        "a1111_password",
        "with --backend a1111: the password of its --api-auth (better in the environment)",
    ),
    ("--a1111-api-key", "a1111_api_key", "with --backend a1111: a key, if it is a DAN server"),
]
NODE_FAMILY_OPTIONS: list[tuple[str, str, str]] = [
    ("--families", "node_families", "model families to serve, e.g. sd15 (empty: all it can)"),
]
SERVE_OPTIONS: list[tuple[str, str, str]] = [
    ("--host", "host", "address to listen on"),
    ("--port", "port", "port to listen on"),
]


def _add_options(parser: argparse.ArgumentParser, options: list[tuple[str, str, str]]) -> None:
    defaults = Settings.model_fields
    for flag, field, text in options:
        default = defaults[field].default
        parser.add_argument(
            flag,
            dest=field,
            default=None,
            help=f"{text} [env DAN_{field.upper()}; default {default}]",
        )


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Environment first, then the command line on top."""
    values = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that reproduces ``settings`` in a child process."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()  # str() would hand the child "**********"
        if value is not None:
            env[f"DAN_{name.upper()}"] = str(value)
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    from dan.metrics.processes import forget_process, share_between_processes

    overrides: dict[str, Any] = {}
    if args.no_download:
        overrides["download"] = False
    if args.no_worker:
        overrides["worker"] = False
    settings = _settings(args, **overrides)
    if settings.metrics:  # before anything imports prometheus_client (see dan.metrics)
        share_between_processes(settings.data_dir)

    import uvicorn

    from dan.api.app import create_app
    from dan.models.bootstrap import ensure_default_checkpoint
    from dan.services import build_services
    from dan.workers.local import LOCAL_NODE_ID, local_session_id, orphaned
    from dan.workers.supervisor import WorkerSupervisor

    supervisor: WorkerSupervisor | None = None

    def wake_worker() -> None:  # the worker child has no NOTIFY on SQLite: wake it
        if supervisor is not None:
            supervisor.wake()

    services = build_services(settings, on_queued=wake_worker)
    if settings.worker:  # an API replica without a worker needs no checkpoint of its own
        threading.Thread(
            target=ensure_default_checkpoint, args=(services.registry, settings), daemon=True
        ).start()
    if settings.worker:
        # A worker of a server that died (kill -9, a power cut) held its tasks until their
        # leases ran out: hand them back at once.
        for session in orphaned(services.nodes.sessions_of(LOCAL_NODE_ID)):
            services.nodes.end_session(LOCAL_NODE_ID, session.id)
        supervisor = WorkerSupervisor(
            settings_env(settings),
            on_exit=lambda session: services.nodes.end_session(LOCAL_NODE_ID, session),
            new_session=lambda: local_session_id(os.getpid()),
            on_exit_pid=forget_process,
        )
    if supervisor:
        supervisor.start()
    # uvicorn sends SIGTERM to the process again after its graceful shutdown: raised as
    # SystemExit here, it lets the finally below stop the worker and close the database.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(create_app(services), host=settings.host, port=settings.port, log_level="info")
    finally:
        if supervisor:
            supervisor.stop()
        services.close()
    return 0


def _exit_cleanly(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def cmd_worker(args: argparse.Namespace) -> int:
    from dan.workers.local import run_local_worker

    run_local_worker(_settings(args), session_id=args.session_id, watch_stdin=args.watch_stdin)
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    if not args.api_key:
        raise DanError("a node needs its owner's API key: --api-key KEY (or env DAN_API_KEY)")
    settings = _settings(args)
    if settings.node_backend == "a1111":  # imports no torch
        from dan.workers.a1111.node import run_a1111_node

        run_a1111_node(settings, args.server, args.api_key, args.name)
    else:
        from dan.workers.node import run_node

        run_node(settings, args.server, args.api_key, args.name)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from dan.services import model_registry

    settings = _settings(args)
    registry = model_registry(settings)
    registry.scan()
    kinds = [ModelKind(args.kind)] if args.kind else list(ModelKind)
    for kind in kinds:
        models = registry.list(kind)
        print(f"{kind.folder}/ ({len(models)})")
        for model in models:
            print(f"  {model.sha256[:10]}  {model.name:40s}  {model.size / 1e6:10.1f} MB")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from dan.models import catalog
    from dan.models.download import pull
    from dan.models.hashing import HashCache
    from dan.models.sources import DownloadSources

    settings = _settings(args)
    entry = catalog.find(args.name)
    hashes = HashCache(settings.cache_dir)
    sources = DownloadSources.from_settings(settings)
    progress = sys.stderr.isatty()
    path = pull(entry, settings.models_dir, progress=progress, hashes=hashes, sources=sources)
    print(f"installed {path} (sha256 {entry.sha256})")
    return 0


KEY_WIDTHS = (36, 20, 8, 16, 16)  # columns of `dan keys list`


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _roles(account: Account) -> str:
    roles = {"admin": account.is_admin, "nodes": account.can_run_nodes}
    return ", ".join(name for name, on in roles.items() if on) or "no roles"


def cmd_keys_create(args: argparse.Namespace) -> int:
    from dan.services import account_services

    with account_services(_settings(args)) as accounts:
        issued = accounts.issue_key(
            args.nickname, email=args.email, is_admin=args.admin, can_run_nodes=args.nodes
        )
    account = issued.account
    state = "created" if issued.created else "existing"
    roles = _roles(account)
    print(f"{state} account {account.nickname} (id {account.id}; {roles})", file=sys.stderr)
    print(f"key id {issued.key.info.id}:", file=sys.stderr)
    print(issued.key.key)
    print("This key is shown only now and is not stored: keep it somewhere safe.", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from dan.services import account_services

    with account_services(_settings(args)) as accounts:
        keys = accounts.all_keys(args.nickname)
    columns = ("key id", "nickname", "prefix", "created", "last used")
    print("  ".join(f"{c:{w}s}" for c, w in zip(columns, KEY_WIDTHS, strict=True)) + "  state")
    for key in keys:
        state = "active" if key.revoked_at is None else f"revoked {_when(key.revoked_at)}"
        cells = (key.id, key.nickname, key.prefix, _when(key.created_at), _when(key.last_used_at))
        print("  ".join(f"{c:{w}s}" for c, w in zip(cells, KEY_WIDTHS, strict=True)) + f"  {state}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from dan.services import account_services

    with account_services(_settings(args)) as accounts:
        if args.account is None:
            keys = [accounts.revoke_key(None, args.key_id)]
        else:
            keys = accounts.revoke_keys(accounts.find(nickname=args.account))
            print(f"revoked {len(keys)} active keys of {args.account}")
    for key in keys:
        print(f"revoked key {key.id} ({key.prefix}...) of {key.nickname}")
    return 0


def cmd_keys_roles(args: argparse.Namespace) -> int:
    from dan.services import account_services

    with account_services(_settings(args)) as accounts:
        target = accounts.find(nickname=args.nickname)
        account = accounts.set_roles(target, is_admin=args.admin, can_run_nodes=args.nodes)
    print(f"{account.nickname}: {_roles(account)}")
    return 0


def cmd_honor_grant(args: argparse.Namespace) -> int:
    from dan.services import account_services

    with account_services(_settings(args)) as accounts:
        target = accounts.find(nickname=args.nickname)
        account = accounts.grant_honor(target, args.amount, by=None, note=args.note)
    print(f"granted {args.amount:g} honor to {account.nickname}; balance {account.honor:g}")
    return 0


def _add_account_commands(sub: Any) -> None:
    """``dan keys create|list|revoke|roles`` and ``dan honor grant``: admin commands on the
    database."""
    keys = sub.add_parser("keys", help="create, list, revoke API keys; set roles").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="a new key (and its account if new), shown once")
    _add_options(create, COMMON_OPTIONS[1:3])
    create.add_argument("--nickname", required=True, help="the account's nickname")
    create.add_argument("--email", help="the account's email (never shown to others)")
    create.add_argument("--admin", action="store_true", help="the account is an admin")
    create.add_argument("--nodes", action="store_true", help="the account may run nodes")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="keys by prefix, with when they were last used")
    _add_options(listing, COMMON_OPTIONS[1:3])
    listing.add_argument("--nickname", help="only this account's keys")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser(
        "revoke", help="revoke a key by its id (see `dan keys list`), or every key of an account"
    )
    _add_options(revoke, COMMON_OPTIONS[1:3])
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("key_id", nargs="?", help="the key's id")
    which.add_argument("--account", metavar="NICKNAME", help="every active key of this account")
    revoke.set_defaults(func=cmd_keys_revoke)
    roles = keys.add_parser("roles", help="give or take an account's admin and node roles")
    _add_options(roles, COMMON_OPTIONS[1:3])
    roles.add_argument("nickname", help="the account's nickname")
    for flag, text in (("--admin", "an admin"), ("--nodes", "allowed to run nodes")):
        roles.add_argument(
            flag, action=argparse.BooleanOptionalAction, help=f"the account is (or is not) {text}"
        )
    roles.set_defaults(func=cmd_keys_roles)

    honor = sub.add_parser("honor", help="grant honor by hand").add_subparsers(
        dest="honor_command", required=True
    )
    grant = honor.add_parser("grant", help="add (or, negative, take back) honor")
    _add_options(grant, COMMON_OPTIONS[1:3])
    grant.add_argument("nickname", help="the account's nickname")
    grant.add_argument("amount", type=float, help="honor to add; negative to correct a mistake")
    grant.add_argument("--note", help="why, kept in the ledger")
    grant.set_defaults(func=cmd_honor_grant)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dan", description="DAN image-generation network")
    parser.add_argument("--version", action="version", version=f"dan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API with an embedded database and a local worker")
    _add_options(serve, SERVE_OPTIONS + COMMON_OPTIONS)
    serve.add_argument(
        "--no-download",
        action="store_true",
        help="never pull the default checkpoint [env DAN_DOWNLOAD=false]",
    )
    serve.add_argument(
        "--no-worker", action="store_true", help="API only, no local worker [env DAN_WORKER=false]"
    )
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a worker on the server's database")
    _add_options(worker, COMMON_OPTIONS)
    worker.add_argument(
        "--watch-stdin",
        action="store_true",
        help="exit when stdin closes; a byte on stdin means a task was queued",
    )
    worker.add_argument(
        "--session-id", default=None, help="the node session to work in [default: a new one]"
    )
    worker.set_defaults(func=cmd_worker)

    node = sub.add_parser("node", help="serve a DAN server over HTTP(S) as a remote GPU node")
    _add_options(node, COMMON_OPTIONS[:2] + COMMON_OPTIONS[3:])
    node.add_argument("--server", required=True, help="the server's URL, e.g. https://dan.example")
    node.add_argument(
        "--api-key",
        default=os.environ.get("DAN_API_KEY"),
        help="a key of an account allowed to run nodes [env DAN_API_KEY]",
    )
    node.add_argument(
        "--name", default=socket.gethostname()[:64], help="this node's name [default: host name]"
    )
    node.add_argument(
        "--backend",
        dest="node_backend",
        choices=["diffusers", "a1111"],
        default=None,
        help="diffusers: run tasks on this machine; a1111: on an AUTOMATIC1111 or Forge "
        "instance, with its models [env DAN_NODE_BACKEND; default diffusers]",
    )
    _add_options(node, A1111_OPTIONS)
    _add_options(node, NODE_FAMILY_OPTIONS)
    node.set_defaults(func=cmd_node)

    models = sub.add_parser("models", help="list and download models").add_subparsers(
        dest="models_command", required=True
    )
    listing = models.add_parser("list", help="installed models with their short hashes")
    _add_options(listing, COMMON_OPTIONS[:2])
    listing.add_argument("--kind", choices=[k.value for k in ModelKind])
    listing.set_defaults(func=cmd_models_list)
    pull = models.add_parser("pull", help="download a catalog model, verified by sha256")
    _add_options(pull, COMMON_OPTIONS[:2])
    pull.add_argument("name", help="catalog name or alias, e.g. chillout_mix")
    pull.set_defaults(func=cmd_models_pull)
    _add_account_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except DanError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
