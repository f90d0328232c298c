"""`attnreg app`: serve the web page of attnreg/app."""

from __future__ import annotations

import argparse
import os

from .common import MODEL_HELP, add_steps_and_guidance, add_threads_arg, model_name, positive_int


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1-65535)")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "app", help="serve a local web page: prompt in, original and regulated images, attention maps out",
        description="Start a local Gradio web app on HOST:PORT (default http://127.0.0.1:7860, this machine only). "
        "--host 0.0.0.0 makes it reachable from the network, at your own risk: there is no login and every "
        "visitor's job runs on this machine.",
    )
    p.add_argument("--model", type=model_name, default=None, help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the pipeline's dtype (default: float32)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=7860, help="TCP port (default: 7860)")
    add_steps_and_guidance(p, steps_help="the page's default number of steps")
    add_threads_arg(p, ", for the one job that runs at a time")
    p.set_defaults(func=cmd_app)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def open_to_network_warning(host: str, port: int) -> str | None:
    """The warning an address other than this machine's own gets at start, None for a loopback one."""
    if host in LOOPBACK or host.startswith("127."):
        return None
    return (f"attnreg app: warning: --host {host} opens the page to the network without a login: anyone who can "
            f"reach this machine on port {port} can run jobs on it; --host 127.0.0.1 keeps it to this machine")


def busy_port_message(host: str, port: int) -> str:
    return (f"port {port} on {host} is in use (another attnreg app?); choose another with --port, "
            f"e.g. --port {port + 1 if port < 65535 else port - 1}")


def check_port(host: str, port: int) -> None:
    """Refuse, before the model loads, a port another program listens on (the bind Gradio would try)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(busy_port_message(host, port)) from None
            raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err}); --host takes an address "
                             "of this machine (127.0.0.1, or 0.0.0.0 for every interface)") from None


def cmd_app(args) -> int:
    import sys

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    from ..pipelines import check_device

    warning = open_to_network_warning(args.host, args.port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    check_device(args.device)
    check_port(args.host, args.port)
    torch.set_num_threads(args.threads)
    from ..app.logic import Engine
    from ..app.ui import launch

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, default_steps=args.steps,
                         default_guidance=args.guidance)
    print(f"attnreg app: {'the embedded shapes model' if args.model is None else args.model} on {args.device}; "
          f"open http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}", flush=True)
    try:
        launch(engine, args.host, args.port, block=True, quiet=True)  # quiet: Gradio's own URL and share-link lines
    except OSError as err:
        if "port" in str(err):  # taken while the model loaded; Gradio's text names its own environment variable
            raise ValueError(busy_port_message(args.host, args.port)) from None
        raise
    return 0
