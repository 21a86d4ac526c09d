"""The site's ClientApp runtime: it runs only app bundles the site approved, and refuses the rest.

Why: in a Flower deployment the coordinator's ``flwr run`` uploads an app bundle (FAB) that the SuperLink hands to
every SuperNode, and Flower's ``flwr-clientapp`` installs and imports whatever arrived
(``flwr/supernode/runtime/run_clientapp.py``: ``install_from_fab``, then the bundle's ``client.app:app``). A
coordinator that edits ``client/dp_sgd.py`` in its copy would receive un-noised updates from every site, whatever the
site's node config says; Flower's own guard (``--trusted-entities``) needs verifications that the open-source
SuperLink does not supply.

How: the site starts its SuperNode with ``--isolation process``, so that the SuperNode starts no ClientApp itself, and
runs this process (``python -m client.runtime``) in place of Flower's ``flower-superexec``. It takes each ClientApp
task from the SuperNode's Runtime API and checks the task's bundle hash, the sha256 of the bundle's bytes (the
SuperNode computes it itself and stores bundles under it: ``store_fab`` in ``flwr/supercore/corestate``):

- approved: by default the bundle Flower builds from this installed fedtail (the release the site installed and
  audited; ``flwr run`` of the same release uploads the same bytes), plus any hash the operator passes with
  ``--approve``. Flower's own ``flwr-clientapp`` of this environment then runs the task, with a Flower home owned by
  this process, in which only approved bundles are ever installed (``install_from_fab`` reuses an app folder that
  already exists, named by only 8 hex digits of the hash, so a shared Flower home could hold other code under an
  approved bundle's name);
- not approved: this process pulls the task's message, answers it with an error naming the bundle (the coordinator's
  ServerApp sees it as the site's reply) and finishes the task as failed. Nothing of the bundle is installed or
  imported, and the site's data, catalogue and ledger are never opened.

Warm: Flower's ``flwr-clientapp`` is a fresh Python process per message (it pulls one task and exits), so every round
would pay a Python start, the imports of torch, opacus, flwr and pandas, and cold caches (noise calibration, the
site's shard): seconds per round, against well under a second of training on a small site. This runtime already lives
as long as the site, so it runs tasks of the *installed* release (the code it was started from, which it imports at
start) in its own process, one after another, with Flower's own calls (``pull_task_input``, ``push_message``,
``push_task_output``) and task heartbeats, as ``flwr-clientapp`` does. Nothing about what runs changes: the same
approved code, the same node config from the site's SuperNode, the same replies. Bundles approved by ``--approve``
(other code than the one loaded here) still get a fresh ``flwr-clientapp`` each, and ``--fresh-process`` gives every
task one (isolation between tasks at the old cost). If the runtime dies mid-task, the SuperNode stops receiving the
task's heartbeats and answers the round with Flower's "ClientApp stopped responding" error, as for a crashed
``flwr-clientapp``; the operator restarts the runtime and the site takes the next round.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.cli.build import build_fab_from_disk
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS, TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from common.errors import ConfigError, FedtailError
from common.flower.pacing import OBJECT_RETRY_SECONDS
from common.utils import timeline
from common.utils.processes import APP_DIR, executable
from common.utils.progress import log

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
POLL_SECONDS = 0.05
"""How often an idle runtime asks its SuperNode for a task: one small local request (flower-superexec asks every
1 s, which a round would wait for on average half of)."""


def bundle_sha256(path: Path) -> str:
    """The sha256 a SuperNode knows an app bundle by: of a ``.fab`` file's bytes, or of the bundle Flower builds
    from an app folder (``flwr run FOLDER`` uploads exactly that build: fixed timestamps, sorted files)."""
    if path.is_dir():
        try:
            return hashlib.sha256(build_fab_from_disk(path)).hexdigest()
        except (ValueError, OSError) as error:
            raise ConfigError(f"{path}: Flower cannot build an app bundle from this folder: {error}") from None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the app bundle: {error.strerror}") from None


def approved_sha256(text: str) -> str:
    digest = text.strip().lower()
    if not SHA256_HEX.match(digest):
        raise ConfigError(f"--approve {text!r}: not a sha256 (64 hex digits); `fedtail deploy bundle-hash` prints one")
    return digest


@dataclass(frozen=True)
class Approval:
    """The app bundles this site runs: its installed release's, and those its operator approved by hash."""

    installed: str
    approved: frozenset[str]

    @classmethod
    def for_site(cls, approved: Iterable[str], installed_app: Path = APP_DIR) -> Approval:
        """``installed_app``: the installed fedtail's folder (an editable install of a checkout, see .ci/install)."""
        listed = {approved_sha256(text) for text in approved}
        installed = bundle_sha256(installed_app)
        return cls(installed, frozenset({installed, *listed}))

    def refusal(self, fab_hash: str) -> str | None:
        """None if the bundle may run here, else the reason the coordinator reads (public values only)."""
        if fab_hash in self.approved:
            return None
        return (
            f"app bundle sha256 {fab_hash or '(none)'} is not approved by this site, which runs only bundles it "
            f"approved ({', '.join(sorted(digest[:12] for digest in self.approved))}); none of its code was run"
        )

    def describe(self) -> str:
        lines = [f"  {digest}{'  (the installed fedtail)' if digest == self.installed else ''}"
                 for digest in sorted(self.approved)]
        return "\n".join(["approved app bundles (sha256):", *lines])


def _runtime_client(
    address: str, root_certificates: Path | None, interceptors: list[ProtobufClientInterceptor], retry: bool
) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API; ``retry``: wait for it to come (back) up, as flower-superexec does."""
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=None if root_certificates is None else str(root_certificates),
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker() if retry else None,
    )


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """The task's message, context, run and bundle, as Flower's ``pull_task_input``
    (``flwr/supernode/runtime/run_clientapp.py``) pulls them, but retrying a missing part of the message after
    0.05 s (doubling up to 0.5 s) instead of 1 s (doubling up to 10 s).

    Why: the SuperNode offers a task as soon as the message's head arrives and fetches its parts (the global
    weights) from the SuperLink afterwards. A runtime that takes the task within 0.05 s asks for parts not there yet,
    and Flower's backoff then waits 1 + 2 + 4 ... s for a transfer that takes a fraction of a second on loopback.
    A ``flwr-clientapp`` rarely meets it: it asks only after its own start of several seconds. The requests go to
    the site's own SuperNode, on the same machine.
    """
    answer = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = answer.task_id
    TaskIdentity.run_id = answer.run.run_id
    TaskIdentity.node_id = answer.context.node_id
    context = context_from_proto(answer.context)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = messages.message_object_trees[0]
    first, longest = OBJECT_RETRY_SECONDS
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=first,
        backoff_cap=longest,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower sets it: the deflated message has none
    return message, context, run_from_proto(answer.run), fab_from_proto(answer.fab)


def _task_client(address: str, token: str, root_certificates: Path | None) -> RuntimeHttpClient:
    """A client of the Runtime API for one task (its ``token``), as ``flwr-clientapp`` connects. No retries: if the
    SuperNode cannot be reached the task expires, as a dead ClientApp's would."""
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)
    ]
    return _runtime_client(address, root_certificates, interceptors, retry=False)


def refuse(address: str, token: str, reason: str, root_certificates: Path | None = None) -> None:
    """Answer the task's message with an error the coordinator sees, then finish the task as failed.

    The same reply Flower's SuperNode sends for a bundle its trusted entities cannot verify
    (``ErrorCode.INVALID_FAB``), sent through the calls ``flwr-clientapp`` uses (``pull_task_input``,
    ``push_message``, ``push_task_output``). No retries: if the SuperNode cannot be reached the task expires, as a
    dead ClientApp's would.
    """
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)
    ]
    client = _runtime_client(address, root_certificates, interceptors, retry=False)
    try:
        message, context, _, _ = pull_task_input(client)
        push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), context)
        push_task_output(client, None, SubStatus.FAILED, reason)
    finally:
        client.close()


def task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat, but one that reports a lost SuperNode as a failed beat instead of raising.

    Why: Flower's heartbeat (``make_task_heartbeat_fn_http``) raises on any HTTP error other than 503 or 504, and it
    runs in a thread of its own, so a SuperNode killed mid-task left an uncaught thread traceback in the site's
    runtime. A failed beat is retried with backoff until the task ends, which is what the task's own calls then
    report (the reply cannot be sent) and ``serve`` logs in one line.
    """
    beat = make_task_heartbeat_fn_http(client)

    def beat_or_fail() -> bool:
        try:
            return beat()
        except Exception:  # noqa: BLE001 - any failure to reach the SuperNode is a missed beat, never a crash
            return False

    return beat_or_fail


def run_in_process(app: ClientApp, address: str, token: str, root_certificates: Path | None = None) -> None:
    """Run one task of the installed release with ``app`` in this process, as ``flwr-clientapp`` runs it in its own
    (``flwr/supernode/runtime/run_clientapp.py``): heartbeats while it runs, the reply, then the task's status and
    context; an exception becomes the error reply Flower sends for a ClientApp that raised, and the runtime goes on."""
    client = _task_client(address, token, root_certificates)
    heartbeat = HeartbeatSender(task_heartbeat(client))
    heartbeat.start()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, _, _ = pull_task_input(client)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # noqa: BLE001 - as flwr-clientapp: the coordinator gets the error, the site goes on
        details = f"{type(error)}:<'{error}'>"
        log(f"fedtail-site runtime: the ClientApp raised {details}")
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
                timeline.emit("site-reply-pushed")
            push_task_output(client, context, status, details)
        finally:
            heartbeat.stop()
            client.close()


def start_clientapp(
    program: str, address: str, token: str, flower_home: Path, root_certificates: Path | None = None
) -> subprocess.Popen[bytes]:
    """Flower's ``flwr-clientapp`` (``program``) for an approved task, as flower-superexec would start it."""
    security = ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    return subprocess.Popen(
        [program, "--runtime-api-address", address, "--token", token, *security, "--parent-pid", str(os.getpid())],
        env={**os.environ, "FLWR_HOME": str(flower_home)},
    )


def serve(
    address: str, approval: Approval, root_certificates: Path | None = None, warm: ClientApp | None = None
) -> None:
    """Take ClientApp tasks from the SuperNode at ``address`` until stopped; run approved ones, refuse the others.

    ``warm``: the installed release's ClientApp, loaded in this process, which then runs the installed bundle's
    tasks here; None starts a ``flwr-clientapp`` for every approved task."""
    program = executable("flwr-clientapp")  # this environment's, the one beside its Python
    client = _runtime_client(
        address, root_certificates, [RuntimeVersionHttpInterceptor(component_name="SuperExec")], retry=True
    )
    running: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fedtail-site-apps-") as flower_home:
        mode = "in this process (warm)" if warm is not None else "in a fresh flwr-clientapp each"
        log(f"fedtail-site runtime: taking ClientApp tasks from the SuperNode at {address}; the installed release "
            f"runs {mode}\n{approval.describe()}")
        while True:
            running = [process for process in running if process.poll() is None]
            answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if answer.HasField("task") and answer.token:
                task = answer.task
                timeline.emit("site-task-acquired", run=task.run_id)
                reason = approval.refusal(task.fab_hash)
                if reason is None and warm is not None and task.fab_hash == approval.installed:
                    try:
                        run_in_process(warm, address, answer.token, root_certificates)
                    except Exception as error:  # noqa: BLE001 - the SuperNode went away mid-task: serve the next
                        log(f"fedtail-site runtime: run {task.run_id}: the task's reply could not be sent "
                            f"({error!r}); the coordinator will see the task time out")
                elif reason is None:
                    log(f"fedtail-site runtime: run {task.run_id}: bundle {task.fab_hash[:12]} approved, starting it")
                    running.append(start_clientapp(program, address, answer.token, Path(flower_home),
                                                   root_certificates))
                else:
                    log(f"fedtail-site runtime: run {task.run_id}: REFUSED: {reason}")
                    try:
                        refuse(address, answer.token, reason, root_certificates)
                    except Exception as error:  # noqa: BLE001 - one failed refusal must not stop the site's runtime
                        log(f"fedtail-site runtime: run {task.run_id}: the refusal could not be sent ({error!r}); "
                            "the coordinator will see the task time out")
                continue  # another task may be waiting
            time.sleep(POLL_SECONDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client.runtime",
        description="Run the ClientApp tasks of a SuperNode started with --isolation process, but only for app "
        "bundles this site approved; refuse the others with a reason the coordinator sees.",
    )
    parser.add_argument("--runtime-api-address", default=SUPERNODE_DEFAULT_CLIENT_ADDRESS,
                        help="the SuperNode's Runtime API: 127.0.0.1 and flower-supernode's --port "
                        f"(default {SUPERNODE_DEFAULT_CLIENT_ADDRESS})")
    parser.add_argument("--approve", action="append", default=[], metavar="SHA256",
                        help="also run this app bundle (repeatable); `fedtail deploy bundle-hash` computes it")
    parser.add_argument("--root-certificates", type=Path, default=None,
                        help="CA of the Runtime API's TLS certificate, if flower-supernode serves it with TLS")
    parser.add_argument("--fresh-process", action="store_true",
                        help="run every task in a fresh flwr-clientapp process (isolation between tasks, at the "
                        "cost of a Python start and imports per round) instead of the installed release in this "
                        "process")
    return parser


def main(load_installed_app: Callable[[], ClientApp], argv: Sequence[str] | None = None) -> int:
    """``python -m client.runtime``; ``load_installed_app`` imports the installed release's ClientApp (client/ lies
    above this module), called only when the runtime runs it warm."""
    args = build_parser().parse_args(argv)
    # `kill` (SIGTERM) stops the runtime like Ctrl-C, so that its Flower home of installed bundles is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        warm = None if args.fresh_process else load_installed_app()  # before hashing: the code that runs is loaded
        serve(args.runtime_api_address, Approval.for_site(args.approve), args.root_certificates, warm)
    except FedtailError as error:
        print(f"fedtail-site runtime: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log("fedtail-site runtime: stopped")
    return 0

