"""The ``clora`` command: ``serve``, ``prepare-model``, ``train`` and ``evaluate`` (continual adapters)."""

from __future__ import annotations

import argparse
import logging
import sys


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .main import create_app
    from .settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    return 0


def _prepare_model(args: argparse.Namespace) -> int:
    from base_model.loader import resolve_model_dir

    from .settings import Settings

    settings = Settings()
    path, name = resolve_model_dir(settings.base_model, settings.model_cache_dir)
    print(f"{name}: {path}")
    kernel_dir = settings.engine.kernel_dir
    if kernel_dir is not None:  # both builds, whatever this CPU runs: an image may be built on another machine
        from .engine.lora_kernel import build_kernel

        for simd in (False, True):
            try:
                print(f"LoRA CPU kernel: {build_kernel(kernel_dir, simd)}")
            except (OSError, RuntimeError) as e:
                print(f"LoRA CPU kernel not built ({e}); the oneDNN term will serve")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clora", description="clora-serve: multi-adapter LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="start the HTTP server (settings from CLORA_* environment variables)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_serve)
    p = sub.add_parser("prepare-model", help="convert the embedded GGUF model to safetensors once")
    p.set_defaults(func=_prepare_model)
    try:
        from continual.cli import add_evaluate_parser, add_train_parser
    except ImportError:
        pass
    else:
        add_train_parser(sub)  # each sets its func itself
        add_evaluate_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
