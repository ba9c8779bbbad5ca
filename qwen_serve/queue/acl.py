"""Least-privilege Redis ACL rules: one user for routers, one for workers.

Each rule set grants only the commands its side runs, each on only the keys it
runs it on (Redis 7 selectors and ``%R``/``%W`` key permissions): no key
scanning, no flushes, no scripts or functions, no ``SELECT`` (database 0), no
``CONFIG``. Workers write reply streams but cannot read them; routers write
jobs but cannot read their content; only routers publish aborts, and a
published id alone aborts nothing (the tenant-scoped marker decides).

``python -m qwen_serve.queue.acl --prefix qs`` prints the ``user`` lines for
redis.conf or an ACL file, with the passwords' SHA-256 (from the environment)
so no password is written down.
"""

from __future__ import annotations

import argparse
import hashlib
import os

from qwen_serve.queue.keys import Keys

CONNECTION = ["+ping", "+hello", "+auth"]


def _on_jobs(keys: Keys, permission: str) -> str:
    """Key patterns of every job stream (HIGH, NORMAL, LOW and the workers' own) with one
    permission prefix."""
    streams = [*keys.job_streams, keys.worker_jobs("*")]
    return " ".join(f"{permission}~{stream}" for stream in streams)


def router_rules(keys: Keys) -> list[str]:
    """Permissions of the router user (without user name and password)."""
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        *CONNECTION,
        f"&{keys.aborts}",
        "+publish",
        f"({_on_jobs(keys, '%W')} +xadd)",
        f"({_on_jobs(keys, '%R')} +xinfo|groups +xpending +xlen)",
        f"(%W~{keys.worker_jobs('*')} +xdel +expire)",  # placed jobs moved to a shared stream
        f"(~{keys.replies('*')} +xread +xtrim +xinfo|stream +expire +del)",
        f"(~{keys.lease('*', 0)} +get +set)",
        f"(%W~{keys.abort_marker('*')} +set)",
        f"(~{keys.routers} +zadd +zrem +zscore)",
        f"(%R~{keys.workers} +zrangebyscore)",
        f"(%R~{keys.worker_status('*')} +mget)",
        "+script|load",  # tenant limits (router/quotas.py): its script, then its commands
        f"(~{keys.prefix}:tenant:* +evalsha +zremrangebyscore +zcard +zadd +zrem"
        " +pexpireat +pexpire +get +incr +incrby)",
    ]


def worker_rules(keys: Keys) -> list[str]:
    """Permissions of the worker user (without user name and password)."""
    jobs = "+xreadgroup +xack +xdel +xclaim +xpending +xinfo|consumers"
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        *CONNECTION,
        f"&{keys.aborts}",
        "+subscribe",
        "+unsubscribe",
        f"({_on_jobs(keys, '')} {jobs} +xgroup|create +xgroup|delconsumer)",
        f"(~{keys.worker_jobs('*')} +expire)",  # its own stream, renewed with its heartbeat
        f"(%W~{keys.dead_letters} +xadd)",
        f"(%W~{keys.replies('*')} +xadd)",
        f"(~{keys.lease('*', 0)} +get +set)",
        f"(%R~{keys.abort_marker('*')} +exists)",
        f"(~{keys.workers} +zadd +zrem +zremrangebyscore +zrangebyscore)",
        f"(~{keys.worker_status('*')} +set +mget +del)",
        f"(%R~{keys.routers} +zrangebyscore)",
    ]


def user_line(name: str, password: str, rules: list[str], hashed: bool = True) -> str:
    """A ``user`` line for redis.conf or an ACL file (the password as its SHA-256)."""
    secret = f"#{hashlib.sha256(password.encode()).hexdigest()}" if hashed else f">{password}"
    return " ".join(["user", name, "on", secret, *rules])


def main(argv: list[str] | None = None) -> None:
    """Print the router and worker ``user`` lines."""
    parser = argparse.ArgumentParser(prog="python -m qwen_serve.queue.acl", description=__doc__)
    parser.add_argument("--prefix", default="qs", help="QS_KEY_PREFIX of the deployment")
    parser.add_argument("--router-user", default="qwen-serve-router")
    parser.add_argument("--worker-user", default="qwen-serve-worker")
    parser.add_argument(
        "--password-env",
        nargs=2,
        metavar=("ROUTER_VAR", "WORKER_VAR"),
        default=("QS_ROUTER_REDIS_PASSWORD", "QS_WORKER_REDIS_PASSWORD"),
        help="environment variables holding the two passwords",
    )
    args = parser.parse_args(argv)
    keys = Keys(args.prefix)
    for name, var, rules in (
        (args.router_user, args.password_env[0], router_rules(keys)),
        (args.worker_user, args.password_env[1], worker_rules(keys)),
    ):
        password = os.environ.get(var)
        if not password:
            parser.error(f"set {var} to the password of {name}")
        print(user_line(name, password, rules))


if __name__ == "__main__":
    main()
