"""`attnreg app`: serve the web page of attnreg/app."""

from __future__ import annotations

import argparse
import os

from .common import MODEL_HELP, model_name, positive_int


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
    p.add_argument("--steps", type=positive_int, default=50, help="the page's default number of steps (default: 50)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default: 1; jobs run one at a time, and results depend on the count)")
    p.set_defaults(func=cmd_app)


def cmd_app(args) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    from ..pipelines import check_device

    check_device(args.device)
    torch.set_num_threads(args.threads)
    from ..app.logic import Engine
    from ..app.ui import launch

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, default_steps=args.steps)
    print(f"attnreg app: {'the embedded shapes model' if args.model is None else args.model} on {args.device}; "
          f"open http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}", flush=True)
    launch(engine, args.host, args.port, block=True)
    return 0
