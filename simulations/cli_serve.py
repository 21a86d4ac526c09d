"""``fedtail serve``: the HTTP recommendation service over a run folder's model, on a port checked before it loads.

A new model written into the run folder is picked up without a restart (``server.reloading``)."""

from __future__ import annotations

import argparse
import socket
import sys

import torch

from common.errors import ConfigError
from common.recommender.augment import AugmentOptions
from common.recommender.ranking import COLD_START_PRIORS, RankingOptions
from common.recommender.rerank import DiversityOptions
from common.utils.arguments import seconds_between


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("run_dir", help="a federated run folder (global_model.pt) or a trained model folder (model.pt)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless you mean it)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port to listen on, 1-65535")
    serve.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when present)")
    serve.add_argument("--watch-interval", type=seconds_between(0), default=1.0,
                       help="check the run folder for a new model every this many seconds and serve it once its files "
                       "have settled (0: never; POST /admin/reload from loopback reloads at once either way)")
    ranking = RankingOptions()
    serve.add_argument("--cold-start-weight", type=float, default=ranking.cold_start_weight,
                       help="blend short histories with a prior at this weight (0: off)")
    serve.add_argument("--cold-start-prior", choices=COLD_START_PRIORS, default=ranking.cold_start_prior,
                       help="model: the model's own empty-history prediction; content: items whose public metadata "
                       "resembles the user's (needs a model trained with --item-text)")
    serve.add_argument("--content-temperature", type=float, default=ranking.content_temperature,
                       help="sharpness of the content prior (softmax of cosine similarity / temperature)")
    serve.add_argument("--cold-start-fade", type=int, default=ranking.cold_start_fade,
                       help="history length at which the blend has faded out")
    serve.add_argument("--tail-penalty", type=float, default=ranking.tail_penalty,
                       help="lift rare items: score - penalty * log(prior) (0: off)")
    diversity, augmentation = DiversityOptions(), AugmentOptions()
    serve.add_argument("--diversity", type=float, default=diversity.diversity,
                       help="default MMR weight of similarity to items already in the list, in [0, 1) (0: the "
                       "model's own order); a request's 'diversity' overrides it")
    serve.add_argument("--repeat-penalty", type=float, default=diversity.repeat_penalty,
                       help="default penalty, in [0, 1], for items a request lists as already 'shown' to the user "
                       "(0: off); a request's 'repeat_penalty' overrides it")
    serve.add_argument("--augment-to", type=int, default=augmentation.augment_to,
                       help="default: score histories shorter than this with pseudo-prior items the model generates "
                       "before them (0: off); a request's 'augment_to' overrides it")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn  # the service's own dependencies load only when serving

    from server.http import create_app
    from server.reloading import LiveRecommender

    ranking = RankingOptions(
        args.cold_start_weight, args.cold_start_fade, args.tail_penalty, args.cold_start_prior, args.content_temperature
    )
    diversity, augmentation = DiversityOptions(args.diversity, args.repeat_penalty), AugmentOptions(args.augment_to)
    with _listen(args.host, args.port) as listening:
        live = LiveRecommender(args.run_dir, torch.device(args.device) if args.device else None, ranking,
                               diversity, augmentation)
        info = live.current.info
        watching = f"checked every {args.watch_interval:g} s" if args.watch_interval else "not watched"
        print(f"fedtail: serving {args.run_dir} (model {info.model_id}, {info.catalog_size} items; run folder "
              f"{watching}) on http://{args.host}:{args.port}  (API docs: /docs)", file=sys.stderr)
        if args.watch_interval:
            live.watch(args.watch_interval)
        config = uvicorn.Config(create_app(live), log_level="warning")
        try:
            uvicorn.Server(config).run(sockets=[listening])
        finally:
            live.stop()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The service's socket, bound here so that a port in use or an unknown host is one clear line (uvicorn would
    log it and exit 1), and before the model loads, so that this fails at once."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    listening = socket.socket(family, kind, protocol)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart at once
        listening.bind(address)
    except OSError as error:
        listening.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listening


def _port(text: str) -> int:
    """argparse type of --port: a TCP port one can listen on (uvicorn on uvloop took 70000 as 70000 - 65536)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 1-65535")
    return port
