"""The checkpoint parts of the ``adamax-ps`` command line.

``serve`` flags (each also an ``ADAMAX_PS_*`` environment variable)::

    --checkpoint-dir DIR  --checkpoint-every-steps N  --checkpoint-every-seconds T
    --keep K  --keep-every M  --restore latest|ckpt-00000042

and the ``checkpoint`` command, talking to a running server::

    adamax-ps checkpoint save|list [--json]
    adamax-ps checkpoint inspect [ID] [--verify]
    adamax-ps checkpoint restore [ID] [--optimizer KEY ...]
    adamax-ps checkpoint download [ID] --output DIR     (no ID: the live state, snapshotted now)
    adamax-ps checkpoint upload --input DIR [--id ID] [--restore] [--no-save]

download/upload move a checkpoint between a server and a local checkpoint directory (same
format, same verification) with a progress line on stderr. A downloaded stored checkpoint keeps
its id; the live state gets a fresh id above every id the server has given, so a local copy
never carries the name of a different server checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from collections.abc import Callable, Sequence
from typing import Any

from adamax_server.errors import NotFound, ServiceError
from adamax_server.storage.checkpoint import LATEST, CheckpointStore, verify_tensors
from adamax_server.storage.checkpointing import CheckpointManager, CheckpointPolicy
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.cli.runtime import _flag, add_tls_client_arguments
from adamax_server.ops.logging_setup import current_format

_log = logging.getLogger("adamax_server")


def add_checkpoint_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("checkpoints")
    _flag(group, "--checkpoint-dir", help="directory of checkpoints; turns checkpointing on")
    _flag(group, "--checkpoint-every-steps", type=int, help="save after this many weights versions of any optimizer")
    _flag(group, "--checkpoint-every-seconds", type=float, help="save this often (when anything changed)")
    _flag(group, "--keep", 5, type=int, help="newest checkpoints to keep")
    _flag(group, "--keep-every", type=int, help="also keep every Mth checkpoint (by sequence number)")
    _flag(group, "--restore", help="restore 'latest' or a checkpoint id from --checkpoint-dir before serving")


def manager_from_args(args: argparse.Namespace, coordinator: Coordinator) -> CheckpointManager | None:
    """The serve command's manager (None without --checkpoint-dir); restores --restore first."""
    if not args.checkpoint_dir:
        if args.restore:
            raise ValueError("--restore needs --checkpoint-dir")
        return None
    policy = CheckpointPolicy(
        every_steps=int(args.checkpoint_every_steps) if args.checkpoint_every_steps else None,
        every_seconds=float(args.checkpoint_every_seconds) if args.checkpoint_every_seconds else None,
        keep=int(args.keep),
        keep_every=int(args.keep_every) if args.keep_every else None,
    )
    manager = CheckpointManager(coordinator, CheckpointStore(args.checkpoint_dir), policy)
    if args.restore:
        if args.restore == LATEST and not manager.store.ids():
            _log.info("no checkpoints in %s yet; starting empty", manager.store.root)
        else:
            used, restored = manager.restore(args.restore)
            summary = ", ".join(f"{r.optimizer}@{r.version}" for r in restored)
            _log.info("restored %s: %s", used, summary, extra={"event": "restored", "checkpoint": used})
            if current_format() != "json":  # scripts read this line (text mode only: JSON has the record)
                print(f"restored {used}: {summary}", flush=True)
    return manager


def final_checkpoint(manager: CheckpointManager) -> Any:
    """For the shutdown path: stop the policy thread, then write the final checkpoint."""
    manager.stop()
    return manager.save_all(reason="shutdown")


# ---------------------------------------------------------------- the checkpoint command


def add_checkpoint_commands(sub: Any, parents: Sequence[argparse.ArgumentParser] = (),
                            target_flag: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    command = sub.add_parser("checkpoint", help="save, list, inspect, restore, download or upload checkpoints",
                             parents=list(parents))
    actions = command.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, parents=list(parents))
        if target_flag is not None:
            target_flag(parser)
        else:
            parser.add_argument("--target", default="127.0.0.1:50051", help="server address (default: %(default)s)")
        parser.add_argument("--timeout", type=float, default=600.0)
        parser.add_argument("--json", action="store_true")
        add_tls_client_arguments(parser)
        return parser

    action("save", "write a checkpoint of every optimizer now").add_argument("--reason", default="manual")
    action("list", "list the server's checkpoints")
    inspect = action("inspect", "show one checkpoint")
    inspect.add_argument("checkpoint_id", nargs="?", default=LATEST)
    inspect.add_argument("--verify", action="store_true", help="check every tensor's sha256")
    restore = action("restore", "restore the running optimizers from a checkpoint (fenced)")
    restore.add_argument("checkpoint_id", nargs="?", default=LATEST)
    restore.add_argument("--optimizer", action="append", default=[], help="only this optimizer (repeatable)")
    download = action("download", "copy a checkpoint (or the live state) into a local directory")
    download.add_argument("checkpoint_id", nargs="?", default="", help="id or 'latest'; empty: the live state")
    download.add_argument("--output", required=True, help="local checkpoint directory")
    download.add_argument("--optimizer", action="append", default=[], help="live state: only this optimizer")
    upload = action("upload", "send a local checkpoint to the server")
    upload.add_argument("--input", required=True, help="local checkpoint directory")
    upload.add_argument("--id", default=LATEST, help="checkpoint id in --input (default: latest)")
    upload.add_argument("--restore", action="store_true", help="also restore it into the running optimizers")
    upload.add_argument("--no-save", action="store_true", help="do not keep it in the server's directory")


class _Progress:
    def __init__(self, verb: str) -> None:
        self.verb, self.start, self.last = verb, time.monotonic(), 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.2 and done < total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9) / 1e6
        percent = 100.0 * done / total if total else 100.0
        end = "\n" if done >= total else ""
        print(f"\r{self.verb} {done / 1e6:.1f}/{total / 1e6:.1f} MB ({percent:.0f}%, {rate:.0f} MB/s)",
              end=end, file=sys.stderr, flush=True)


def _print(args: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(value, indent=2, default=str) if args.json else text)


def _describe(s: Any) -> str:
    state = "ok" if s.valid else f"CORRUPT: {s.error}"
    opts = ", ".join(f"{o['optimizer']}@{o['version']} (it {o['iterations']})" for o in s.optimizers)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_unix)) if s.created_unix else "-"
    return f"{s.checkpoint_id}  {when}  {s.reason or '-'}  {s.nbytes / 1e6:.1f} MB  {state}  {opts}"


def run_checkpoint_command(args: argparse.Namespace) -> int:
    from adamax_client.checkpoints import CheckpointClient
    from adamax_client.errors import AdamaxError

    from adamax_server.cli.runtime import client_connection

    try:
        client = CheckpointClient(args.target, timeout=args.timeout, **client_connection(args))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, client)
    except AdamaxError as exc:
        print(f"error: {args.target}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ServiceError) as exc:  # local directory problems, corrupt local checkpoints
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _run(args: argparse.Namespace, client: Any) -> int:
    if args.action == "save":
        info = client.save(args.reason)
        _print(args, asdict(info), f"saved {_describe(info)}")
    elif args.action == "list":
        infos = client.list()
        _print(args, [asdict(i) for i in infos], "\n".join(_describe(i) for i in infos) or "no checkpoints")
    elif args.action == "inspect":
        info = client.inspect(args.checkpoint_id, verify=args.verify)
        _print(args, asdict(info), _describe(info))
        return 0 if info.valid else 1
    elif args.action == "restore":
        used, restored = client.restore(args.checkpoint_id, args.optimizer)
        _print(args, {"checkpoint_id": used, "restored": [asdict(r) for r in restored]},
               f"restored {used}: " + ", ".join(f"{r.optimizer} -> version {r.version}" for r in restored))
    elif args.action == "download":
        source, manifest, files = client.download(args.checkpoint_id, args.optimizer, progress=_Progress("download"))
        for opt in manifest["optimizers"]:  # end to end: what arrived is what the server hashed
            verify_tensors(opt, files.get(opt["file"], {}), f"downloaded checkpoint, optimizer '{opt['key']}'")
        store = CheckpointStore(args.output)
        if args.checkpoint_id:  # a stored checkpoint keeps the id the server gave it
            info = store.write_encoded(dict(manifest, reason=f"download of {source}"), files, checkpoint_id=source)
        else:  # the live state: a fresh id, above every id the server gave so far (never one of them)
            server_ids = [c.checkpoint_id for c in client.list()]
            info = store.write_encoded(dict(manifest, reason="download of the live state"), files, above=server_ids)
        _print(args, asdict(info), f"downloaded {source} to {args.output}/{info.checkpoint_id}")
    else:
        if not os.path.isdir(args.input):  # never create the input directory
            raise NotFound(f"--input {args.input}: no such directory (a local checkpoint directory, as "
                           "written by `checkpoint download --output` or `serve --checkpoint-dir`)")
        store = CheckpointStore(args.input)
        if not store.ids():
            raise NotFound(f"--input {args.input}: no checkpoints in this directory")
        checkpoint_id = store.load_latest()[0] if args.id == LATEST else args.id
        manifest, files = store.read(checkpoint_id)
        saved, restored = client.upload(manifest, files, save=not args.no_save, restore=args.restore,
                                        progress=_Progress("upload"))
        text = f"uploaded {checkpoint_id}" + (f" as {saved.checkpoint_id}" if saved else "")
        if restored:
            text += "; restored " + ", ".join(f"{r.optimizer} -> version {r.version}" for r in restored)
        _print(args, {"saved": asdict(saved) if saved else None, "restored": [asdict(r) for r in restored]}, text)
    return 0
