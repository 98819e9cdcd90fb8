"""The sharded-job parts of the ``adamax-ps`` command line.

``serve --shard-index I --shards A0,A1,...`` (env ``ADAMAX_PS_SHARD_INDEX``, ``ADAMAX_PS_SHARDS``)
runs one shard of a sharded job: a shard needs nothing but its index and the shard list
(``A0`` is the leader). ``--checkpoint-dir`` holds this shard's parts of the job's cuts; on
shard 0, ``--checkpoint-every-steps/--checkpoint-every-seconds`` take cuts of every optimizer;
``--restore latest`` loads this shard's newest cut before serving (the leader brings the other
shards to a common cut if they moved on).

``status``, ``checkpoint save|list|restore|download|upload`` accept the shard list as
``--target A0,A1,...`` and act on the whole job: ``download`` assembles a cut into the
single-server checkpoint format (the same Keras store as an unsharded job), ``upload`` re-splits
a single-server checkpoint (or an assembled cut) onto this job's shard count and restores it
on every shard.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
from typing import Any

import grpc

from adamax_server.cli.runtime import ENV_PREFIX, _flag, _switch, shard_index_from_hostname

_log = logging.getLogger("adamax_server")


def add_shard_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("sharded jobs")
    _flag(group, "--shard-index", type=int, help="this server's index in --shards (0 is the job's leader)")
    _switch(group, "--shard-index-from-hostname",
            "take the index from the ordinal the hostname ends with (a StatefulSet's pod adamax-ps-2 is shard 2)")
    _flag(group, "--shards", help="every shard's host:port, in index order, comma-separated")
    _flag(group, "--shard-token", help="bearer token this shard presents to the others (default: ADAMAX_PS_TOKEN)")
    _flag(group, "--staging-ttl", 300.0, type=float, help="seconds a staged, uncommitted push is kept")
    _flag(group, "--shard-call-timeout", 10.0, type=float, help="deadline of one leader-to-shard call")
    _flag(group, "--shard-watch-seconds", 2.0, type=float,
          help="(shard 0) seconds between looks for a restarted shard, which heal the job at once (0: only pushes notice)")
    _flag(group, "--min-piece-bytes", 256 << 10, type=int,
          help="smallest row range a variable is split into (same on every shard)")


def is_sharded_target(target: str) -> bool:
    return "," in target


def serve_sharded(args: argparse.Namespace) -> int:
    from adamax_server.cli.runtime import GracefulShutdown, server_kwargs
    from adamax_server.sharding.rpc import parse_shards
    from adamax_server.sharding.server import create_shard_server
    from adamax_server.transport.security import SecurityConfigError, TokenAuthInterceptor

    try:
        hardening = server_kwargs(args)
        shards = parse_shards(args.shards)
        index = _shard_index(args, shards)
    except (SecurityConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.restore and not args.checkpoint_dir:
        print("error: --restore needs --checkpoint-dir", file=sys.stderr)
        return 2
    from adamax_server.ops.metrics import MetricsInterceptor, ServerMetrics

    metrics = ServerMetrics()
    interceptors: list[Any] = [MetricsInterceptor(metrics)]
    if "tokens" in hardening:
        interceptors.append(TokenAuthInterceptor(hardening["tokens"]))
    token = args.shard_token or os.environ.get(ENV_PREFIX + "TOKEN")
    link_credentials = None
    if "credentials" in hardening and args.tls_ca:
        # The leader's calls to the other shards verify them by the CA; under mutual TLS they
        # present this shard's own certificate, which the other shards trust by the same CA.
        with open(args.tls_ca, "rb") as f:
            ca = f.read()
        key = chain = None
        if args.tls_require_client_cert:
            with open(args.tls_key, "rb") as f:
                key = f.read()
            with open(args.tls_cert, "rb") as f:
                chain = f.read()
        link_credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
    try:
        server, port = create_shard_server(
            f"{args.host}:{args.port}", index, shards, max_workers=args.max_threads, interceptors=interceptors,
            credentials=hardening.get("credentials"), device=args.device, checkpoint_dir=args.checkpoint_dir,
            keep_cuts=int(args.keep), min_piece_bytes=int(args.min_piece_bytes), staging_ttl=float(args.staging_ttl), call_timeout=float(args.shard_call_timeout),
            link_credentials=link_credentials, link_token=token, metrics=metrics,
            bulk=hardening.get("bulk"), bulk_port=int(hardening.get("bulk_port", 0)), bulk_tls=hardening.get("bulk_tls"),
            shared_memory=bool(hardening.get("shared_memory", True)), call_limits=hardening.get("call_limits"), watch_interval=float(args.shard_watch_seconds) or None,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    registry = server.shard_registry
    if args.restore:
        if args.restore != "latest":
            print("error: a shard restores 'latest'; restore a given cut with `adamax-ps checkpoint restore ID "
                  "--target A0,A1,...`", file=sys.stderr)
            return 2
        for key, cut in registry.restore_latest_on_start():
            _log.info("restored optimizer '%s' from cut %s", key, cut)
    stop_cuts = threading.Event()
    if index == 0 and args.checkpoint_dir and (args.checkpoint_every_steps or args.checkpoint_every_seconds):
        threading.Thread(target=_cut_loop, args=(registry, args, stop_cuts), daemon=True, name="cuts").start()
    from adamax_server.cli.health_file import HealthAnnouncement

    announce = HealthAnnouncement(getattr(args, "health_file", None), server.health, tls="credentials" in hardening)
    stopped = [*announce.prepare(), stop_cuts.set, registry.close, metrics.close]
    shutdown = GracefulShutdown(server, grace=float(args.grace), on_stopped=stopped)
    shutdown.install()
    server.start()
    _log.info("adamax-ps shard %d of %d listening on %s:%d (leader %s)", index, len(shards), args.host, port, shards[0])
    if server.bulk is not None:
        _log.info("bulk channel on %s:%d (staging and pulls; %s; shared memory for same-host workers: %s)", args.host,
                  server.bulk.port, "TLS" if server.bulk.tls is not None else "TCP", server.bulk.shared_memory)
    print(f"listening on {args.host}:{port}", flush=True)
    metrics_port = None
    if args.metrics_port is not None:
        metrics_host = args.metrics_host or args.host  # as reachable as the shard itself, as on one server
        metrics_port = metrics.serve_http(args.metrics_port, metrics_host, labels={"shard": str(index)})
        _log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
        print(f"metrics on {metrics_host}:{metrics_port}", flush=True)
    announce.publish(args.host, port, shard_index=index, num_shards=len(shards),
                     bulk_port=server.bulk.port if server.bulk is not None else None,
                     metrics_port=metrics_port)
    return shutdown.run()


def _shard_index(args: argparse.Namespace, shards: list[str]) -> int:
    """``--shard-index``, or the hostname's ordinal with ``--shard-index-from-hostname``."""
    if not args.shard_index_from_hostname:
        if args.shard_index is None:
            raise ValueError("--shards needs --shard-index or --shard-index-from-hostname (env ADAMAX_PS_SHARD_INDEX)")
        return int(args.shard_index)
    index = shard_index_from_hostname()
    if args.shard_index is not None and int(args.shard_index) != index:
        raise ValueError(f"--shard-index {args.shard_index} contradicts --shard-index-from-hostname ({index})")
    if index < len(shards):
        own = socket.gethostname().split(".", 1)[0]
        listed = shards[index].rsplit(":", 1)[0].split(".", 1)[0]
        if listed != own:  # an IP address, or another name for this host: allowed, but worth a look
            _log.warning("shard %d: the shard list names %s, this host is %s", index, shards[index], own)
    return index


def _cut_loop(registry: Any, args: argparse.Namespace, stop: threading.Event) -> None:
    """On the leader: a cut of every optimizer every N versions and/or T seconds."""
    import time

    every_steps = int(args.checkpoint_every_steps) if args.checkpoint_every_steps else None
    every_seconds = float(args.checkpoint_every_seconds) if args.checkpoint_every_seconds else None
    last: dict[str, tuple[int, float]] = {}
    # Every N versions is looked at 20 times a second (a fast job moves ~100 versions in the
    # 0.5 s that is enough for a time policy), so a cut is rarely more than a few versions late.
    tick = 0.05 if every_steps else 0.5
    while not stop.wait(tick):
        for row in registry.status():
            key, version = row["optimizer"], row["version"]
            if not row["built"]:
                continue
            at, when = last.get(key, (0, time.monotonic()))
            due = (every_steps and version - at >= every_steps) or (
                every_seconds and version != at and time.monotonic() - when >= every_seconds
            )
            if due:
                try:
                    cut = registry.checkpoint(key)
                    last[key] = (cut["version"], time.monotonic())
                    _log.info("cut %s of '%s' at version %d", cut["id"], key, cut["version"])
                except Exception as exc:  # noqa: BLE001 - retried after a pause
                    _log.warning("cut of '%s' failed: %s", key, exc)
                    last[key] = (at, time.monotonic())
                    stop.wait(1.0)  # not 20 failing attempts a second while a shard is away


# ---------------------------------------------------------------- commands on a shard list


class _Job:
    """Calls to every shard of a job (the CLI's side of ``ShardService.Call``)."""

    def __init__(self, target: str, timeout: float, connection: dict[str, Any]) -> None:
        from adamax_server.sharding.rpc import parse_shards

        self.targets = parse_shards(target)
        self.timeout = timeout
        creds = connection.get("credentials")
        self._channels = [grpc.secure_channel(t, creds) if creds else grpc.insecure_channel(t) for t in self.targets]
        self._token = connection.get("token")

    def call(self, shard: int, key: str, method: str, *args: Any) -> Any:
        from adamax_server.sharding.rpc import GrpcLink

        link = GrpcLink(shard, self.targets[shard], key, self._channels[shard], self._token)
        return link.call(method, *args, timeout=self.timeout)

    def keys(self) -> list[str]:
        return [row["optimizer"] for row in self.call(0, "", "status")]

    def close(self) -> None:
        for c in self._channels:
            c.close()


def _health(targets: list[str], timeout: float, connection: dict[str, Any]) -> list[str]:
    """Each shard's health status name (SERVING, NOT_SERVING), or UNREACHABLE."""
    from adamax_server.cli.runtime import check_health

    out = []
    for target in targets:
        try:
            out.append(check_health(target, timeout=min(timeout, 5.0), connection=connection))
        except (grpc.RpcError, ValueError, OSError):
            out.append("UNREACHABLE")
    return out


def run_sharded_status(args: argparse.Namespace) -> int:
    """Every optimizer of the job with each shard's health, version, bytes and staged pushes.

    A shard that does not answer is shown as such (the others still are); the exit status is 1
    when any shard is not SERVING or the leader cannot describe the job.
    """
    from adamax_server.cli.runtime import client_connection

    connection = client_connection(args)
    job = _Job(args.target, args.timeout, connection)
    health = _health(job.targets, args.timeout, connection)
    try:
        per_shard: list[list[dict[str, Any]] | None] = []
        for i in range(len(job.targets)):
            try:
                per_shard.append(job.call(i, "", "status") if health[i] != "UNREACHABLE" else None)
            except Exception as exc:  # noqa: BLE001 - shown as this shard's state
                _log.debug("shard %d status: %s", i, exc)
                per_shard.append(None)
        rows = []
        for key in [r["optimizer"] for r in per_shard[0] or []]:
            info = job.call(0, key, "describe")
            rows.append({
                "optimizer": key, "built": info["built"], "version": info.get("leader", {}).get("version", info["version"]),
                "iterations": info["iterations"], "lagging": info.get("leader", {}).get("lagging", []),
                "shards": [
                    {"index": i, "target": job.targets[i], "health": health[i],
                     **next((r for r in per_shard[i] or [] if r["optimizer"] == key), {})}
                    for i in range(len(job.targets))
                ],
            })  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a CLI reports and exits
        print(f"error: {args.target}: {exc}", file=sys.stderr)
        for i, target in enumerate(job.targets):
            print(f"  shard {i} {target}: {health[i]}", file=sys.stderr)
        return 1
    finally:
        job.close()
    status = 0 if all(h == "SERVING" for h in health) and per_shard[0] is not None else 1
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return status
    if per_shard[0] is None or not rows:
        print(f"{args.target}: " + ("the leader (shard 0) did not answer" if per_shard[0] is None else "no optimizers"))
        for i, target in enumerate(job.targets):
            print(f"  shard {i} {target}: {health[i]}")
    for row in rows:
        print(f"{row['optimizer']}: built={row['built']} version={row['version']} iterations={row['iterations']}"
              + (f" lagging={row['lagging']}" if row["lagging"] else ""))
        for s in row["shards"]:
            print(f"  shard {s['index']} {s['target']}: {s['health']} version={s.get('version')} "
                  f"bytes={s.get('bytes')} staged={s.get('staged')}")
    return status


def run_sharded_checkpoint(args: argparse.Namespace) -> int:
    from adamax_server.cli.runtime import client_connection

    job = _Job(args.target, args.timeout, client_connection(args))
    try:
        return _checkpoint(args, job)
    except Exception as exc:  # noqa: BLE001 - a CLI reports and exits
        print(f"error: {args.target}: {exc}", file=sys.stderr)
        return 1
    finally:
        job.close()


def _common_cuts(job: _Job, key: str) -> list[str]:
    held = [set(job.call(i, key, "list_cuts")) for i in range(len(job.targets))]
    return sorted(set.intersection(*held))


def _checkpoint(args: argparse.Namespace, job: _Job) -> int:
    from adamax_server.storage.checkpoint import LATEST, CheckpointStore, verify_tensors

    out: Any
    if args.action == "save":
        out = [{"optimizer": k, **job.call(0, k, "checkpoint")} for k in job.keys()]
        text = "\n".join(f"{o['optimizer']}: cut {o['id']} at version {o['version']} on {o['shards']} shards" for o in out)
    elif args.action in ("list", "inspect"):
        out = {k: _common_cuts(job, k) for k in job.keys()}
        text = "\n".join(f"{k}: {', '.join(v) or 'no cuts held by every shard'}" for k, v in out.items())
    elif args.action == "restore":
        keys = args.optimizer or job.keys()
        out = [{"optimizer": k, **job.call(0, k, "restore", args.checkpoint_id or LATEST)} for k in keys]
        text = "\n".join(f"restored {o['optimizer']} to cut {o['id']} (version {o['version']})" for o in out)
    elif args.action == "download":  # assembled by the leader (sharding.assembled)
        used, manifest, files = job.call(0, "", "download", args.checkpoint_id,
                                         list(args.optimizer or []))  # fmt: skip
        for opt in manifest["optimizers"]:  # end to end: what arrived is what the leader hashed
            verify_tensors(opt, files.get(opt["file"], {}), f"downloaded checkpoint, optimizer '{opt['key']}'")
        info = CheckpointStore(args.output).write_encoded(dict(manifest, reason=f"download of {used} from {args.target}"), files)
        out = {"checkpoint_id": info.checkpoint_id, "optimizers": [o["key"] for o in manifest["optimizers"]]}
        text = f"downloaded {', '.join(out['optimizers'])} assembled to {args.output}/{info.checkpoint_id}"
    else:  # upload: re-split onto this job's shard count by the leader, saved as a cut and restored
        store = CheckpointStore(args.input)
        checkpoint_id = store.load_latest()[0] if args.id == LATEST else args.id
        manifest, files = store.read(checkpoint_id)
        got = job.call(0, "", "upload", manifest, files, not getattr(args, "no_save", False), True)
        out = [{"optimizer": k, "id": got["checkpoint_id"], "version": v} for k, v, _ in got["restored"]]
        text = "\n".join(f"uploaded and restored {o['optimizer']}: cut {o['id'] or '(not saved)'} (version {o['version']})" for o in out)
    print(json.dumps(out, indent=2, default=str) if args.json else text)
    return 0
