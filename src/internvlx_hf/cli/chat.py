"""`internvlx chat`: ask an InternVL-X checkpoint about images, with the answer streamed token by token."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..generation import end_of_turn_token_ids
from .command import CLIError, Command
from .quantization import add_quantization_arguments, check_quantization_available, quantization_flag

_CHAT_DESCRIPTION = """\
Load MODEL's processor and model (AutoProcessor / AutoModel with trust_remote_code=True; a local folder, or a Hub
id when the Hub is reachable), build the prompt with the checkpoint's chat template and stream the answer as it is
generated (transformers' TextStreamer). Generation stops at the template's end-of-turn token (e.g. <|im_end|>),
as InternVL2's chat() does, or after --max-new-tokens. Decoding is greedy.

With a QUESTION: answer it and exit. Without one: an interactive loop (one question per line; stdin may be a pipe)
that keeps the conversation, as InternVL2's chat(history=...) does: every turn re-sends the whole conversation, and
the --image images belong to the first question only (they stay in the conversation; they are not repeated).
Commands in the loop:
  /image PATH   attach another image to the next question (it joins the conversation from there on)
  /reset        forget the conversation; the --image images go with the next question again
  /exit         leave (so does end of input, Ctrl-D)"""

_CHAT_EPILOG = """\
examples:
  # one question about one image
  internvlx chat ./InternVL2-2B-hf --image photo.jpg "What is in this picture?"

  # RVTC edge tiling with at most 6 tiles, bfloat16 on the GPU
  internvlx chat ./InternVL-X-2B-HD --image page.png --tiling edge --max-tiles 6 \\
      --dtype bfloat16 --device cuda "Summarise this page."

  # two images in one question: the template puts them before the text, in order
  internvlx chat ./InternVL2-2B-hf --image a.jpg --image b.jpg "What differs between the two?"

  # an interactive conversation (multi-turn); or feed the questions through a pipe
  internvlx chat ./InternVL2-2B-hf --image photo.jpg
  printf 'Describe the image.\\nWhat colour is the car?\\n' | internvlx chat ./InternVL2-2B-hf --image photo.jpg"""

_DTYPES = ("auto", "float32", "bfloat16", "float16")


class _IntermixedArgumentParser(argparse.ArgumentParser):
    """Parses positionals wherever they appear, so `chat MODEL --image X "question"` works: plain argparse binds
    every positional at the first run of them (MODEL) and then rejects the question after the options."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.__class__ = _IntermixedArgumentParser  # the subparser build_parser made for `chat`
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder (from `internvlx convert`) or Hub id")
    parser.add_argument("question", metavar="QUESTION", nargs="?", default=None,
                        help="the question; without it, an interactive conversation")
    parser.add_argument("--image", metavar="PATH", action="append", default=[],
                        help="an image for the (first) question; repeat for several images")
    parser.add_argument("--tiling", choices=("ratio", "area", "edge", "none"), default=None,
                        help="tile-count rule (default: the checkpoint's processor setting)")
    parser.add_argument("--max-tiles", type=int, default=None, metavar="N",
                        help="tile budget per image (default: the checkpoint's processor setting)")
    parser.add_argument("--dtype", choices=_DTYPES, default="auto",
                        help="weights dtype (default auto: as saved)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps or auto (default: every GPU when there is one, else cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                        help="longest answer in tokens (default 512)")
    add_quantization_arguments(parser)


class ChatSession:
    """A conversation with a model, kept as chat messages plus the images in the order of their `<image>` tags.

    ``images`` go with the first question (and again after `reset`); `attach` adds images to the next question.
    Each `ask` renders the whole conversation with the processor's chat template, so earlier images stay in the
    prompt as InternVL2's ``chat(history=...)`` keeps them.
    """

    def __init__(self, model, processor, images: list[Any] = (), tiling: str | None = None,
                 max_tiles: int | None = None, max_new_tokens: int = 512, stream: bool = True):
        self.model = model
        self.processor = processor
        self.initial_images = list(images)
        self.image_kwargs = {key: value for key, value in (("tiling", tiling), ("max_tiles", max_tiles))
                             if value is not None}
        self.max_new_tokens = max_new_tokens
        self.stream = stream
        self.eos_token_ids = end_of_turn_token_ids(processor, model.generation_config)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.images: list[Any] = []
        self.pending_images = list(self.initial_images)

    def attach(self, image: Any) -> None:
        self.pending_images.append(image)

    def ask(self, question: str) -> str:
        """Answer ``question`` (streamed to stdout when ``stream``) and add the turn to the conversation."""
        import torch
        from transformers import TextStreamer

        content = [{"type": "image"} for _ in self.pending_images] + [{"type": "text", "text": question}]
        messages = [*self.messages, {"role": "user", "content": content}]
        images = self.images + self.pending_images
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt", **self.image_kwargs)
        inputs = inputs.to(self.model.device)
        tokenizer = self.processor.tokenizer
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if self.stream else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         eos_token_id=self.eos_token_ids, pad_token_id=pad, streamer=streamer)
        new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
        for index, token in enumerate(new_tokens):
            if token in self.eos_token_ids:
                new_tokens = new_tokens[:index]
                break
        answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.images = images
        self.pending_images = []
        return answer


def _device_map(name: str):
    """``from_pretrained``'s device_map for --device: weights go straight to the device (no CPU copy first);
    "auto" spreads a model over every GPU (accelerate) when there is one."""
    import torch

    if name == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N, mps or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here; use --device cpu (or auto).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: MPS is not available here; use --device cpu (or auto).")
    return str(device)


def load_chat_model(model: str, dtype: str = "auto", device: str = "auto", processor=None,
                    load_in_bits: int | None = None):
    """``(model, processor)`` of a checkpoint folder or Hub id, on ``device``, in eval mode; ``processor``: the
    checkpoint's processor when the caller has loaded it already.

    ``load_in_bits`` 4 or 8: the weights are quantized while loading (bitsandbytes, `internvlx_hf.quantization`:
    projectors and lm_head stay in ``dtype``); 4-bit layers then compute in ``dtype`` (float32 for auto).
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from ..hub.resolve import read_internvlx_config, resolve_model

    check_quantization_available(load_in_bits)
    device_map = _device_map(device)
    path = resolve_model(model)
    read_internvlx_config(path, f"MODEL {str(model)!r}")
    if processor is None:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    kwargs = {}
    if load_in_bits is not None:
        from ..quantization import bitsandbytes_config

        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        kwargs = {"config": config, "quantization_config": bitsandbytes_config(
            load_in_bits, config, compute_dtype=None if dtype == "auto" else torch_dtype,
            what=quantization_flag(load_in_bits))}
    loaded = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch_dtype, device_map=device_map,
                                       **kwargs).eval()
    if load_in_bits is not None:
        from ..quantization import check_kept_modules

        check_kept_modules(loaded, kwargs["quantization_config"].llm_int8_skip_modules)
    return loaded, processor


def _check_images(paths: list[str]) -> None:
    for path in paths:
        if Path(path).is_dir():
            raise CLIError(f"--image {path!r} is a folder, not an image file; pass the path of an image file.")
        if not Path(path).is_file():
            raise CLIError(f"--image {path!r}: no such file; pass an existing image file (URLs are not downloaded).")


def _interactive(session: ChatSession, stdin) -> None:
    tty = stdin.isatty()
    if tty:
        attached = len(session.initial_images)
        print(f"{attached} image(s) go with the first question. Commands: /image PATH, /reset, /exit "
              "(Ctrl-D ends).", file=sys.stderr)
    while True:
        if tty:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                print("(conversation reset)", file=sys.stderr)
            elif command == "/image" and rest.strip():
                try:
                    _check_images([rest.strip()])
                except CLIError as error:
                    print(error, file=sys.stderr)
                    continue
                session.attach(rest.strip())
            else:
                print(f"unknown command {text!r}; use /image PATH, /reset or /exit", file=sys.stderr)
            continue
        session.ask(text)


def _run_chat(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    if args.max_tiles is not None and args.max_tiles < 1:
        raise CLIError(f"--max-tiles must be >= 1, got {args.max_tiles}.")
    if args.question is not None and not args.question.strip():
        raise CLIError("the QUESTION is empty; ask something, or leave it out for an interactive conversation.")
    _check_images(args.image)
    check_quantization_available(args.load_in_bits)
    model, processor = load_chat_model(args.model, args.dtype, args.device, load_in_bits=args.load_in_bits)
    session = ChatSession(model, processor, args.image, tiling=args.tiling, max_tiles=args.max_tiles,
                          max_new_tokens=args.max_new_tokens)
    if args.question is not None:
        session.ask(args.question)
    else:
        _interactive(session, sys.stdin)
    return 0


CHAT = Command(
    name="chat",
    help="ask a checkpoint about images; streams the answer (one question, or a multi-turn conversation)",
    description=_CHAT_DESCRIPTION,
    epilog=_CHAT_EPILOG,
    add_arguments=_add_chat_arguments,
    run=_run_chat,
)
