"""`python run.py [serve|token|…]`: the service's command line."""

from __future__ import annotations

import argparse
import sys

from conversational_core.settings import ConfigError, Settings, load_settings


def _serve(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(
        "conversational_core.app:create_app",
        factory=True,
        host=settings.HOST,
        port=settings.PORT,
        reload=settings.RELOAD,
        workers=None if settings.RELOAD else settings.WORKERS,
        loop="uvloop",
        http="httptools",
        log_config=None,  # Loguru takes over (observability/logging.py)
        server_header=False,
        timeout_graceful_shutdown=30,
    )


def _token(settings: Settings, args: argparse.Namespace) -> None:
    from conversational_core.auth.tokens import issue_token

    roles = [r for part in args.roles or [] for r in part.split(",") if r]
    print(issue_token(settings, args.sub, roles, args.ttl))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.py", description="Conversational Core")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the HTTP API (the default)")
    token = commands.add_parser("token", help="print a token signed with the configured key")
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument("--roles", nargs="*", help="roles, e.g. admin or service")
    token.add_argument("--ttl", type=int, default=3600 * 24, help="lifetime in seconds")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"conversational-core: {exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        _token(settings, args)
    else:
        _serve(settings)
    return 0
