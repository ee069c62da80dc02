"""`internvlx bench`: measurements on your own checkpoint and hardware (prefill, train-step, memory, serve)."""

from __future__ import annotations

import argparse

from ..bench.server_load import DEFAULT_IMAGE_SIZE
from .command import CLIError, Command, check_image_file

_BENCH_DESCRIPTION = """\
Measure a checkpoint on this machine, against its plain variants built from the same weights:

  prefill FOLDER     one forward pass of a prompt (no labels, no grad): seconds per call
  train-step FOLDER  forward with labels + backward: seconds per step
  memory FOLDER      peak memory of prefill and train-step per variant
  serve URL          requests/s and p50/p95 latency of a running OpenAI-compatible server (ours or vLLM);
                     --turns N: chats of N turns resent whole, first against later turns and prefix-cache hits

Variants (--variants): "this" (the folder as saved), "plain-256" (same weights, LVTC off: every layer at the short
layout, 256 tokens per 448 px tile) and "plain-1024" (same weights, an MLP projector at downsample 1.0: 1024 tokens
per tile; an LVTC model's HR projector, else a new seeded one). The prompt holds one image of --tiles tiles, by
default the folder's own budget (its processor's max_tiles + the thumbnail): at 1 tile LVTC's fixed extra work can
outweigh its saving. The tiles are seeded noise, or --image FILE's tiles through the folder's processor.

An InternVL3.5-Flash folder (config.json has a router, "vir") has the variants "this" (its router on: per tile 256
or, compressed, 64 tokens) and "router-off" (the same weights, config.vir.enabled = False: plain InternVL3.5, every
tile 256), the default for it, and the ratios are to router-off; plain-256 (router-off, here) and plain-1024 measure
LVTC, which it has not, and are refused. Its table adds "compressed" (the tiles the router compressed / the tiles)
and "llm_tokens" (the prompt the LLM received after the router shortened it). The router decides on the tiles it is
given, and noise tiles are no image of yours: --image FILE benches it on one (`internvlx tokens FOLDER --image ...`
shows its decisions on many).

Timings: --warmup untimed rounds, then rounds that call every variant once each (interleaved, so a change of load
hits all alike), by default (--repeats auto) until every figure's 95% interval is within --precision of it or the
next round would pass --time-budget seconds (at least 6 rounds). Each figure is the median with its interval; the
vs_plain-1024 column (vs_router-off for a Flash folder; vs the first variant when neither is measured) is the median
of the per-round ratios to it, with its interval, and a line says when that interval holds 1.0 ("within the noise":
the run cannot tell the two apart).

Memory: on CUDA, torch.cuda.max_memory_allocated during one call after a warm-up; on CPU, the peak bytes of the
tensors alive during that call (activations, saved tensors, gradients): what a variant holds, the same on every call.

Every subcommand prints a table, writes the rows with the environment (versions, commit, device, dtype, threads) as
JSON with --out FILE, and draws a chart with --plot FILE.png (needs matplotlib; timings with their intervals).
Progress goes to stderr."""

_BENCH_EPILOG = """\
examples:
  internvlx bench prefill ./InternVL2-2B-X --device cuda --dtype bfloat16 --out prefill.json
  internvlx bench prefill ./InternVL2-2B-X --tiles 1 --time-budget 120
  internvlx bench train-step ./InternVL2-2B-X --device cuda --dtype bfloat16 --repeats 20 --plot train.png
  internvlx bench memory ./InternVL2-2B-X --variants this,plain-1024
  internvlx bench prefill ./InternVL3_5-2B-Flash-X --image photo.jpg --device cuda --dtype bfloat16
  internvlx bench serve http://127.0.0.1:8000 --concurrency 1 --concurrency 8 --requests 64
  internvlx bench serve http://127.0.0.1:8000 --turns 4 --requests 8 --concurrency 1 --concurrency 4"""

_MODEL_HELP = {
    "prefill": "seconds per prefill (one forward pass, no grad) against plain-256 / plain-1024 (a Flash folder: "
               "its router off)",
    "train-step": "seconds per training step (forward + backward) against plain-256 / plain-1024 (a Flash folder: "
                  "its router off)",
    "memory": "peak memory of prefill and train-step per variant",
}


def _add_common(parser: argparse.ArgumentParser, plot_default_help: str) -> None:
    parser.add_argument("--out", metavar="FILE", default=None, help="write the rows and environment as JSON")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help=f"draw {plot_default_help} (matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _repeats(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"give auto or a number of rounds >= 1, not {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"give a number > 0, not {text!r}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="an InternVL-X checkpoint folder")
    parser.add_argument("--variants", default=None,
                        help="comma-separated: this, plain-256, plain-1024, router-off (default: this,plain-256,"
                             "plain-1024; an InternVL3.5-Flash folder: this,router-off, its only ones)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tiles", type=int, default=None, metavar="N",
                        help="image tiles in the prompt (default: the folder's budget, its processor's max_tiles + "
                             "the thumbnail)")
    parser.add_argument("--text-tokens", type=int, default=64, metavar="N", help="text tokens (default 64)")
    parser.add_argument("--image", default=None, metavar="FILE",
                        help="the prompt's image: its tiles as the folder's processor makes them (instead of "
                             "--tiles noise tiles); what an InternVL3.5-Flash router decides on")
    if kind != "memory":
        parser.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed rounds first (default 1)")
        parser.add_argument("--repeats", type=_repeats, default=None, metavar="auto|N",
                            help="timed rounds: auto (default) times until --precision or --time-budget; N: exactly "
                                 "N rounds (fewer than 6 give intervals below 95%%)")
        parser.add_argument("--time-budget", type=_positive, default=60.0, metavar="S",
                            help="auto: stop before the round that would pass S seconds (default 60; at least 6 "
                                 "rounds are run)")
        parser.add_argument("--precision", type=_positive, default=0.02, metavar="F",
                            help="auto: stop once every figure's 95%% interval is within F of it (default 0.02)")
    else:
        parser.add_argument("--workload", action="append", choices=("prefill", "train-step"), default=None,
                            help="repeatable (default: both)")
    _add_common(parser, "horizontal bars per variant and workload" if kind == "memory" else
                "seconds per variant and the ratios to plain-1024, with their intervals")


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)
    for kind in ("prefill", "train-step", "memory"):
        _add_model_arguments(sub.add_parser(kind, help=_MODEL_HELP[kind], description=_MODEL_HELP[kind] + "."),
                             kind)
    serve = sub.add_parser("serve", help="requests/s and p50/p95 latency of a running OpenAI-compatible server",
                           description="Chat completions with a generated PNG image at each --concurrency level.")
    serve.add_argument("url", metavar="URL", help="the server's base address, e.g. http://127.0.0.1:8000")
    serve.add_argument("--model", default=None, help="model name to ask for (default: the first of /v1/models)")
    serve.add_argument("--concurrency", type=int, action="append", default=None, metavar="N",
                       help="parallel clients; repeat for several levels (default: 1 and 4)")
    serve.add_argument("--requests", type=int, default=16, metavar="N",
                       help="requests per level (default 16); with --turns, chats per level")
    serve.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, metavar="PX",
                       help=f"square image side (default {DEFAULT_IMAGE_SIZE}: 4 tiles of 448 px and a thumbnail, so "
                            "that a model that decides per tile, as InternVL3.5-Flash's router, has tiles to decide "
                            "among; 448 is one tile)")
    serve.add_argument("--max-tokens", type=int, default=16, metavar="N", help="answer length bound (default 16)")
    serve.add_argument("--turns", type=int, default=1, metavar="N",
                       help="conversation mode: each request a chat of N turns about one image, resent whole each "
                            "turn with the server's answers; the row splits first-turn and later-turn latency "
                            "(what a prefix cache shortens) and counts the prompt tokens the server served from its "
                            "cache where it says so (vLLM: --enable-prompt-tokens-details). Default 1")
    serve.add_argument("--same-image", action="store_true",
                       help="every request about one image (many users asking about one picture)")
    serve.add_argument("--api-key", default=None, help="Bearer key, if the server wants one")
    serve.add_argument("--timeout", type=float, default=300, metavar="S", help="per request (default 300)")
    _add_common(serve, "a bar chart of requests/s per concurrency (with --turns: first and later turns' p50 latency)")


def _check_bench(args: argparse.Namespace) -> None:
    if args.bench_command == "serve":
        from ..bench.server_load import check_url

        check_url(args.url)
        return
    from ..bench.variants import VARIANTS, check_folder, check_variants, default_variants

    check_folder(args.folder)
    if args.variants is None:
        args.variant_names = list(default_variants(args.folder))
    else:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        if not names or any(n not in VARIANTS for n in names):
            raise CLIError(f"--variants {args.variants}: choose from {', '.join(VARIANTS)} (comma-separated).")
        try:
            args.variant_names = check_variants(args.folder, names)
        except ValueError as error:
            raise CLIError(str(error)) from None
    if args.image is not None:
        if args.tiles is not None:
            raise CLIError("--tiles and --image: the image's tiles are what the folder's processor makes of it; pass "
                           "one of them.")
        check_image_file(args.image)


def _run_bench(args: argparse.Namespace) -> int:
    from functools import partial

    from ..bench.harness import BenchError, format_table, plot_rows, results, write_results

    progress = not args.quiet
    notes: list[str] = []
    try:
        if args.bench_command == "serve":
            from ..bench.server_load import bench_chat, bench_serve, chat_notes, plot_chat

            settings = dict(url=args.url, model=args.model, concurrency=args.concurrency or [1, 4],
                            requests=args.requests, image_size=args.image_size, max_tokens=args.max_tokens,
                            turns=args.turns, same_image=args.same_image)
            if args.turns == 1:
                rows = bench_serve(args.url, settings["concurrency"], args.requests, args.model, args.image_size,
                                   args.max_tokens, args.api_key, args.timeout, progress, args.same_image)
                table, columns = rows, ["concurrency", "requests", "requests_per_s", "p50_s", "p95_s",
                                        "completion_tokens"]
                plot = partial(plot_rows, rows=rows, label="concurrency", value="requests_per_s",
                               title="internvlx bench serve", ylabel="requests/s")
            else:
                rows = bench_chat(args.url, settings["concurrency"], args.requests, args.turns, args.model,
                                  args.image_size, args.max_tokens, args.api_key, args.timeout, progress,
                                  args.same_image)
                table, columns = rows, ["concurrency", "chats", "turns_per_s", "first_p50_s", "later_p50_s",
                                        "later_p95_s", "later_vs_first", "later_prompt_tokens", "later_cached_tokens"]
                notes = chat_notes(rows)
                plot = partial(plot_chat, rows=rows, title=f"internvlx bench serve --turns {args.turns}")
        elif args.bench_command == "memory":
            from ..bench.checkpoint_runs import WORKLOADS, memory_notes, memory_table, memory_variants, plot_memory

            workloads = args.workload or list(WORKLOADS)
            rows, run = memory_variants(args.folder, workloads, args.variant_names, args.device, args.dtype,
                                        args.tiles, args.text_tokens, progress, image=args.image)
            settings = dict(folder=args.folder, variants=args.variant_names, device=args.device, dtype=args.dtype,
                            tiles=run["tiles"], tiles_from=run["tiles_from"], text_tokens=args.text_tokens,
                            workloads=workloads, **({"image": args.image} if args.image else {}))
            table, columns = memory_table(rows)
            notes = memory_notes(rows, run)
            plot = partial(plot_memory, rows=rows, title=f"internvlx bench memory ({run['tiles']} tiles)")
        else:
            from ..bench.checkpoint_runs import plot_timing, time_variants, timing_notes, timing_table

            rows, run = time_variants(args.folder, args.bench_command, args.variant_names, args.device, args.dtype,
                                      args.tiles, args.text_tokens, args.warmup, args.repeats, args.time_budget,
                                      args.precision, progress, image=args.image)
            settings = dict(folder=args.folder, variants=args.variant_names, device=args.device, dtype=args.dtype,
                            tiles=run["tiles"], tiles_from=run["tiles_from"], text_tokens=args.text_tokens,
                            warmup=args.warmup, repeats="auto" if args.repeats is None else args.repeats,
                            time_budget_s=args.time_budget, precision=args.precision, rounds=run["rounds"],
                            stopped=run["stopped"], **({"image": args.image} if args.image else {}))
            table, columns = timing_table(rows, run["reference"])
            notes = timing_notes(rows, run, args.bench_command, args.precision)
            plot = partial(plot_timing, rows=rows, reference=run["reference"],
                           title=f"internvlx bench {args.bench_command} ({run['tiles']} tiles, {run['rounds']} rounds)")
    except BenchError as error:
        raise CLIError(str(error)) from error
    print(format_table(table, columns))
    for line in notes:
        print(line)
    name = f"bench {args.bench_command}"
    if args.out:
        print(f"wrote {write_results(args.out, results(name, rows, settings))}")
    if args.plot:
        print(f"wrote {plot(args.plot)}")
    return 0


BENCH = Command(
    name="bench",
    help="measure prefill, train-step, memory or a server on your checkpoint and hardware",
    description=_BENCH_DESCRIPTION,
    epilog=_BENCH_EPILOG,
    add_arguments=_add_bench_arguments,
    run=_run_bench,
    check=_check_bench,
)
