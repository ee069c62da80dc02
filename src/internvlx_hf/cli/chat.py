"""`internvlx chat`: ask an InternVL-X checkpoint about images or a video, with the answer streamed token by token."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

from ..generation import end_of_turn_token_ids
from ..hub.resolve import check_model_argument
from .command import CLIError, Command, check_image_file
from .quantization import add_quantization_arguments, check_quantization_available

_CHAT_DESCRIPTION = """\
Load MODEL's processor and model (AutoProcessor / AutoModel with trust_remote_code=True; a local folder, or a Hub
id when the Hub is reachable), build the prompt with the checkpoint's chat template and stream the answer as it is
generated (transformers' TextStreamer). Generation stops at the template's end-of-turn token (e.g. <|im_end|>),
as InternVL2's chat() does, or after --max-new-tokens. Decoding is greedy.

With a QUESTION: answer it and exit. Without one: an interactive loop (one question per line; stdin may be a pipe)
that keeps the conversation, as InternVL2's chat(history=...) does: every turn re-sends the whole conversation, and
the --image images belong to the first question only (they stay in the conversation; they are not repeated).

With --video: --frames frames (default 8) are taken at the centres of equal segments of the video, or of --bound
START,END (seconds), as InternVL2's load_video does; each frame is one tile and the question is prefixed with
"Frame1: <image>\\nFrame2: <image>..." (one line per frame). A video file needs PyAV (pip install
"internvlx-hf[video]"); a folder of frame images does not.
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

  # a video: 16 frames from seconds 2 to 10
  internvlx chat ./InternVL2-2B-hf --video clip.mp4 --frames 16 --bound 2,10 "What happens?"

  # an interactive conversation (multi-turn); or feed the questions through a pipe
  internvlx chat ./InternVL2-2B-hf --image photo.jpg
  printf 'Describe the image.\\nWhat colour is the car?\\n' | internvlx chat ./InternVL2-2B-hf --image photo.jpg"""

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder (from `internvlx convert`) or Hub id")
    parser.add_argument("question", metavar="QUESTION", nargs="?", default=None,
                        help="the question; without it, an interactive conversation")
    parser.add_argument("--image", metavar="PATH", action="append", default=[],
                        help="an image for the (first) question; repeat for several images")
    parser.add_argument("--video", metavar="PATH", default=None,
                        help="a video file or folder of frame images for the (first) question")
    parser.add_argument("--frames", type=int, default=None, metavar="N",
                        help="frames taken from --video (default 8, InternVL2's num_segments)")
    parser.add_argument("--bound", default=None, metavar="START,END",
                        help="take the --video frames from this span only (seconds, e.g. 2,10)")
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

    ``images`` and ``videos`` (each a list of frames) go with the first question (and again after `reset`), videos
    first; `attach` adds images to the next question.
    Each `ask` renders the whole conversation with the processor's chat template, so earlier images stay in the
    prompt as InternVL2's ``chat(history=...)`` keeps them.
    """

    def __init__(self, model, processor, images: list[Any] = (), tiling: str | None = None,
                 max_tiles: int | None = None, max_new_tokens: int = 512, stream: bool = True,
                 videos: list[list[Any]] = ()):
        self.model = model
        self.processor = processor
        self.initial_images = list(images)
        self.initial_videos = [list(frames) for frames in videos]
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
        self.videos: list[list[Any]] = []
        self.pending_videos = list(self.initial_videos)

    def attach(self, image: Any) -> None:
        self.pending_images.append(image)

    def ask(self, question: str) -> str:
        """Answer ``question`` (streamed to stdout when ``stream``) and add the turn to the conversation."""
        import torch
        from transformers import TextStreamer

        content = [{"type": "video"} for _ in self.pending_videos] + [{"type": "image"} for _ in self.pending_images]
        messages = [*self.messages, {"role": "user", "content": content + [{"type": "text", "text": question}]}]
        images = self.images + self.pending_images
        videos = self.videos + self.pending_videos
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # Frames are already chosen (decoded once, at the start): the processor uses them as given.
        inputs = self.processor(text=[prompt], images=images or None, videos=videos or None, return_tensors="pt",
                                **self.image_kwargs)
        self._check_context(int(inputs["input_ids"].shape[1]), images, inputs.get("num_patches"), videos)
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
        self.images, self.videos = images, videos
        self.pending_images, self.pending_videos = [], []
        return answer

    def _check_context(self, prompt_tokens: int, images: list[Any], num_patches, videos=None) -> None:
        """Refuse a prompt longer than the LLM's context, before generating, with the --max-tiles that fits.

        Past ``max_position_embeddings`` transformers only warns, and the answer is garbage (a Llama LLM has 4,096
        positions: two images at 12 tiles exceed it). With LVTC the limit applies to the long layout of layers
        >= k, where every tile counts its high-resolution tokens."""
        from ..token_budget import layer_groups

        config = self.model.config
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        tiles = int(num_patches.sum()) if num_patches is not None else 0
        positions = layer_groups(config, prompt_tokens, tiles)[-1][1]
        if limit is None or positions < limit:
            return
        where = f" (LVTC: {config.hr_tokens_per_tile} per tile from layer k on)" if positions != prompt_tokens else ""
        problem = (f"the prompt needs {positions:,} positions{where}, and the model has {limit:,} "
                   "(text_config.max_position_embeddings)")
        if videos:
            raise CLIError(f"{problem}; use fewer --frames (each frame is one tile) or fewer images.")
        sizes = [_image_size(image) for image in images]
        if not images or None in sizes:
            raise CLIError(f"{problem}; ask a shorter question, or /reset a long conversation.")
        kwargs = dict(self.image_kwargs)
        max_tiles = kwargs.pop("max_tiles", self.processor.image_processor.max_tiles)

        def positions_at(n: int) -> int:  # the prompt's positions with every image at up to n tiles
            visual = sum(self.processor.num_visual_tokens(sizes, max_tiles=n, **kwargs))
            return layer_groups(config, text_tokens + visual, visual // self.processor.image_seq_length)[-1][1]

        visual_now = sum(self.processor.num_visual_tokens(sizes, max_tiles=max_tiles, **kwargs))
        text_tokens = prompt_tokens - visual_now
        images_cost = (f"{len(images)} image{'s' if len(images) > 1 else ''} at up to {max_tiles} "
                       f"tile{'s' if max_tiles > 1 else ''} take{'' if len(images) > 1 else 's'} {visual_now:,} tokens")
        lowest = max(1, int(self.processor.image_processor.min_tiles))
        needed = None  # positions at the last --max-tiles tried: `lowest` once the loop has run
        for n in range(max_tiles - 1, lowest - 1, -1):
            needed = positions_at(n)
            if needed < limit:
                raise CLIError(f"{problem}: its {images_cost}; use --max-tiles {n} ({needed:,} positions) "
                               "or fewer images.")
        if layer_groups(config, text_tokens, 0)[-1][1] >= limit:
            raise CLIError(f"{problem}: the text alone takes {text_tokens:,}; ask a shorter question, or /reset a "
                           "long conversation.")
        at_lowest = positions_at(lowest) if needed is None else needed
        raise CLIError(f"{problem}: its {images_cost} (--max-tiles {lowest} still needs {at_lowest:,} "
                       "positions); use fewer images.")


def _image_size(image: Any) -> tuple[int, int] | None:
    """(width, height) of an image path or PIL image (the header only), else None."""
    if hasattr(image, "size") and not callable(image.size) and len(image.size) == 2:
        return tuple(image.size)
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as opened:
            return opened.size
    return None


def _check_images(paths: list[str]) -> None:
    for path in paths:
        check_image_file(path)


def parse_bound(text: str | None) -> tuple[float, float] | None:
    """--bound START,END (seconds) -> (start, end); the values are checked where every caller's bound is
    (`processing.video.check_bound`), so the CLI only parses the text."""
    if text is None:
        return None
    from ..processing.video import check_bound

    try:
        start, end = (float(part) for part in text.split(","))
    except ValueError:
        raise CLIError(f"--bound {text!r}: expected START,END in seconds, e.g. --bound 2,10.") from None
    try:
        return check_bound((start, end))
    except ValueError as error:
        raise CLIError(f"--bound {text!r}: {error}.") from None


def check_video_support(processor, model: str) -> None:
    """Checkpoints saved before video support carry processor code that would ignore `videos=`: refuse them."""
    if "videos" not in inspect.signature(type(processor).__call__).parameters:
        raise CLIError(f"MODEL {model!r}: its processor code (saved with the checkpoint) predates video support; "
                       "re-save the processor with the current internvlx-hf (internvlx convert, or "
                       "InternVLXProcessor.from_pretrained(...).save_pretrained(...)).")


def _interactive(session: ChatSession, stdin) -> None:
    tty = stdin.isatty()
    if tty:
        attached = len(session.initial_images)
        if session.initial_videos:
            print(f"A video of {len(session.initial_videos[0])} frames goes with the first question.", file=sys.stderr)
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
        try:
            session.ask(text)
        except CLIError as error:  # e.g. a prompt past the context: the conversation goes on (/reset, /exit)
            print(f"error: {error}", file=sys.stderr)


def _check_chat(args: argparse.Namespace) -> None:
    """The arguments' checks that need no heavy import: answered before torch loads."""
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    if args.max_tiles is not None and args.max_tiles < 1:
        raise CLIError(f"--max-tiles must be >= 1, got {args.max_tiles}.")
    if args.question is not None and not args.question.strip():
        raise CLIError("the QUESTION is empty; ask something, or leave it out for an interactive conversation.")
    if args.video is None and (args.bound is not None or args.frames is not None):
        raise CLIError("--frames and --bound choose the frames of --video; pass --video PATH too.")
    if args.frames is not None and args.frames < 1:
        raise CLIError(f"--frames must be >= 1, got {args.frames}.")
    check_model_argument(args.model)
    _check_images(args.image)
    if args.video is not None and not Path(args.video).exists():
        raise CLIError(f"--video {args.video!r}: no such file or folder; pass a video file or a folder of frame "
                       "images.")


def video_frames(path: str, frames: int, bound: tuple[float, float] | None) -> list[Any]:
    """The frames of --video (`loading.load_video_frames`), a bad video as one line naming the flag."""
    from ..loading import load_video_frames

    try:
        return load_video_frames(path, frames, bound)
    except ValueError as error:
        raise CLIError(f"--video: {error}") from None


def _run_chat(args: argparse.Namespace) -> int:  # after _check_chat (CHAT.check)
    from ..loading import load_checkpoint

    check_quantization_available(args.load_in_bits)  # before decoding a video
    videos = []
    if args.video is not None:
        videos = [video_frames(args.video, 8 if args.frames is None else args.frames, parse_bound(args.bound))]
    model, processor = load_checkpoint(args.model, args.dtype, args.device, load_in_bits=args.load_in_bits)
    if videos:
        check_video_support(processor, args.model)
    session = ChatSession(model, processor, args.image, tiling=args.tiling, max_tiles=args.max_tiles,
                          max_new_tokens=args.max_new_tokens, videos=videos)
    if args.question is not None:
        session.ask(args.question)
    else:
        _interactive(session, sys.stdin)
    return 0


CHAT = Command(
    name="chat",
    help="ask a checkpoint about images or a video; streams the answer (one question, or a multi-turn conversation)",
    description=_CHAT_DESCRIPTION,
    epilog=_CHAT_EPILOG,
    add_arguments=_add_chat_arguments,
    run=_run_chat,
    check=_check_chat,
    intermixed=True,  # `chat MODEL --image X "question"`: the question after the options
)
