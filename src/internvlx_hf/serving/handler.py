"""`InternVLXChatCompletionHandler`: transformers' chat-completions handler behind this server's checks, with the
work before generation off the event loop and the generation itself queued (`queue.GenerationQueue`).

``handle_request`` is composed of transformers' own steps (``_resolve_model``, the generation manager,
``get_processor_inputs_from_messages``, the processor's ``apply_chat_template``, ``_build_generation_config``,
``_streaming`` / ``_non_streaming``, in transformers' order, unchanged from 5.16 to 5.24), with everything before
generation moved off the event loop (`workers.ServingWork`): the body is checked (`validation`: its fields, the text's
length, the tags the model reserves for images), the request's images are read, fetched and opened under the server's
`MediaPolicy` (`media`), decoded and tiled while the request holds a decode slot, and the chat template rendered and
tokenized on a worker thread; the prompt and ``max_tokens`` must fit the model's context (a 400 as OpenAI answers
it), and without ``max_tokens`` the answer is capped to what fits; a chat-template refusal is a 400. Generation then
waits for a running slot in the server's `GenerationQueue` (a 503 with ``Retry-After`` when too many wait), runs on
a thread of its own taking turns on the model with the other running generations (`slicing`: ``generation_slice``
tokens a turn), and runs at most the queue's deadline (then answers what it has, ``finish_reason: "length"``).

Generation gets the processor's tokenizer instead of the processor: transformers passes it to
``generate(tokenizer=...)``, whose stop strings (the request's "stop") call ``get_vocab``, which a processor lacks.

This module imports transformers' serving stack (FastAPI, openai: the ``serve`` extra): `app.build_app` imports it
once `app.check_serving_available` passed; importing `internvlx_hf.serving` does not.
"""

from __future__ import annotations

import asyncio

from transformers.cli.serving.chat_completion import ChatCompletionHandler

from ..processing.image_processing_internvlx import describe_image_input
from .middleware import parsed_body
from .limits import RequestLimits
from .media import MediaRefused, decode_images, read_request_images, return_freed_memory
from .policy import MediaPolicy
from .queue import DeadlineCriteria, GenerationQueue
from .slicing import RoundRobinLock, SliceCriteria, SliceTurns, SlicedGeneration, Turn
from .validation import InvalidRequest, check_reserved_tags, check_text_fits, validate_chat_request
from .workers import ServingWork


class InternVLXChatCompletionHandler(ChatCompletionHandler):
    """transformers' chat-completions handler behind the checks of `validation` and `media`, with the work before
    generation on the server's worker threads and generation in the server's queue.

    ``media_policy``: what the request's images may be read or fetched from, and their limits; ``limits``: the
    request's (images per request; ``max_context``, ``vocab_size``, ``longest_token_chars`` and ``reserved_tags``
    are the served model's); ``work``: the server's worker threads and decode slots; ``queue``: the server's
    generation queue (its bounds on running and waiting requests); ``generation_timeout``: seconds one generation
    may run; ``generation_slice``: new tokens a running generation makes before the next running one has its turn.
    """

    def __init__(self, *args, media_policy: MediaPolicy | None = None, limits: RequestLimits | None = None,
                 work: ServingWork | None = None, queue: GenerationQueue | None = None,
                 generation_timeout: float | None = None, generation_slice: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.media_policy = media_policy or MediaPolicy()
        self.limits = limits or RequestLimits()
        self.work = work or ServingWork()
        self.queue = queue
        self.generation_timeout = generation_timeout
        self.generation_slice = generation_slice
        self.model_lock = RoundRobinLock()

    # Hook 4: transformers' steps, with the request checked first and the CPU work off the event loop.
    async def handle_request(self, body, request_id):
        work = self.work
        body, images = await work.prepare(self._check_body, parsed_body(body))
        self._validate_request(body)  # transformers' own (it logs the ignored fields)
        model_id, model, processor = self._resolve_model(body)
        modality = self.model_manager.get_model_modality(model, processor=processor)
        use_cb = self.generation_state.use_continuous_batching(model, modality)
        gen_manager = self.generation_state.get_manager(model_id, use_cb=use_cb)
        queued = self.queue is not None and not use_cb and hasattr(gen_manager, "async_submit")
        if queued:
            self.queue.check_room()  # a 503 before the images are decoded, when too many wait already
        wheres = [f"messages[{index}]: {describe_image_input(count, url)}"
                  for count, (url, _, index) in enumerate(images)]
        if images:
            try:
                opened = await read_request_images(
                    [(url, where, param) for (url, param, _), where in zip(images, wheres)], self.media_policy, work)
            except MediaRefused as error:
                raise InvalidRequest(str(error), error.param) from None
            async with work.decode_slot(sum(image.size[0] * image.size[1] for image in opened)) as slot:
                inputs, prompt = await work.prepare(self._processor_inputs, body, opened, wheres, images, processor,
                                                    model, modality, use_cb)
                del opened  # the decoded pixels go before the slot does
            if slot:  # large images were decoded: their freed memory goes back to the system
                await work.prepare(return_freed_memory)
        else:
            inputs, prompt = await work.prepare(self._processor_inputs, body, [], [], [], processor, model, modality,
                                                use_cb)
        gen_config = self._build_generation_config(body, model.generation_config, use_cb=use_cb)
        context = self.limits.max_context
        if body.get("max_tokens") is None and context is not None:  # transformers' default, within the context
            gen_config.max_new_tokens = min(gen_config.max_new_tokens or context, context - prompt)
        if use_cb:
            gen_manager.init_cb(model, gen_config)
        tokenizer = getattr(processor, "tokenizer", processor)
        if not queued:
            return await self._generate(request_id, model, tokenizer, model_id, inputs, gen_config, gen_manager,
                                        body.get("stream"))
        tokens = gen_config.max_new_tokens or 1
        await self.queue.acquire(tokens)
        loop = asyncio.get_running_loop()
        # The slot is freed when the generation's thread ends (a stream's generation runs on whether or not, or how
        # fast, its client reads), or here if no thread was started.
        turn = Turn()
        sliced = SlicedGeneration(self.model_lock, turn, lambda: loop.call_soon_threadsafe(self.queue.release, tokens))
        try:
            self._add_stopping_criteria(inputs, gen_config, prompt, turn)
            return await self._generate(request_id, model, tokenizer, model_id, inputs, gen_config, sliced,
                                        body.get("stream"))
        except BaseException:
            if not sliced.started:
                self.queue.release(tokens)
            raise

    async def _generate(self, request_id, model, tokenizer, model_id, inputs, gen_config, gen_manager, stream):
        if stream:
            return self._streaming(request_id, model, tokenizer, model_id, inputs, gen_config,
                                   gen_manager=gen_manager)
        return await self._non_streaming(request_id, model, tokenizer, model_id, inputs, gen_config,
                                         gen_manager=gen_manager)

    def _add_stopping_criteria(self, inputs, gen_config, prompt: int, turn: Turn) -> None:
        """The generation's turns on the model (`SliceTurns`), its stop once its client went away (`SliceCriteria`),
        and its stop at the server's deadline, after which transformers reports ``finish_reason: "length"`` (it
        compares the tokens generated with ``gen_config.max_new_tokens``, which is set to them)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        def cut(generated: int) -> None:
            gen_config.max_new_tokens = generated

        criteria = [] if self.generation_timeout is None else [DeadlineCriteria(self.generation_timeout, prompt, cut)]
        criteria.append(SliceCriteria(turn))
        inputs["stopping_criteria"] = StoppingCriteriaList(criteria)
        inputs["logits_processor"] = LogitsProcessorList([SliceTurns(self.model_lock, turn, self.generation_slice)])

    def _check_body(self, body) -> tuple[dict, list[tuple[str, str, int]]]:
        """The checked body and its images as ``(url, param, message index)``."""
        body, images = validate_chat_request(body, self.limits)
        check_text_fits(body["messages"], self.limits)
        check_reserved_tags(body["messages"], self.limits.reserved_tags)
        indexed = []
        for url, param in images:
            indexed.append((url, param, int(param[len("messages["):param.index("]")])))
        return body, indexed

    def _processor_inputs(self, body, opened, wheres, images, processor, model, modality, use_cb):
        """On a worker thread: the images decoded, the messages rendered and tokenized by the processor, the prompt
        checked against the context; ``(inputs on the model's device, prompt tokens)``."""
        from jinja2.exceptions import TemplateError

        for image, where, (_, param, _) in zip(opened, wheres, images):
            try:
                decode_images([image], [where])
            except MediaRefused as error:
                raise InvalidRequest(str(error), param) from None
        messages = _with_images(body["messages"], opened)
        processor_inputs = self.get_processor_inputs_from_messages(messages, modality)
        del messages
        try:
            inputs = processor.apply_chat_template(processor_inputs, add_generation_prompt=True,
                                                   tools=body.get("tools") or None,
                                                   return_tensors=None if use_cb else "pt", return_dict=True,
                                                   tokenize=True, **self.chat_template_kwargs)
        except TemplateError as error:  # the chat template's raise_exception: the conversation's shape
            raise InvalidRequest(f"The chat template refused the messages: {error}", "messages") from None
        prompt = inputs["input_ids"]
        prompt = len(prompt) if isinstance(prompt, list) else int(prompt.shape[-1])
        self._fit_context(prompt, body.get("max_tokens"))
        if not use_cb:
            inputs = inputs.to(model.device)
        return inputs, prompt

    def _fit_context(self, prompt: int, requested: int | None) -> None:
        """The prompt (known once the processor ran) and max_tokens must fit the model's context."""
        context = self.limits.max_context
        if context is None:
            return
        completion = requested if requested is not None else 1  # without max_tokens: at least one token
        if prompt + completion > context:
            asked = f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion)" if \
                requested is not None else f"{prompt} tokens in the messages, and at least one to answer"
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, you requested {asked}. "
                "Please reduce the length of the messages (fewer or smaller images, shorter text) or the "
                "completion (max_tokens).", "messages", code="context_length_exceeded")

    # Hook 5 (a static method in transformers too): OpenAI messages -> the processor's chat messages.
    @staticmethod
    def get_processor_inputs_from_messages(messages, modality):
        try:
            converted = ChatCompletionHandler.get_processor_inputs_from_messages(messages, modality)
        except (KeyError, TypeError, AttributeError) as error:
            raise InvalidRequest(f"malformed messages ({type(error).__name__}: {error}); each message needs a role "
                                 "and a content: a string, or a list of {'type': 'text', 'text': ...} and "
                                 "{'type': 'image_url', 'image_url': {'url': ...}} parts", "messages") from None
        return [_with_decoded_images(message) for message in converted]


def _with_images(messages: list[dict], images: list) -> list[dict]:
    """``messages`` with each image part's URL replaced by its decoded image (transformers passes a non-string ``url``
    through to `get_processor_inputs_from_messages`)."""
    decoded = iter(images)
    converted = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            converted.append(message)
            continue
        parts = [{"type": "image_url", "image_url": {"url": next(decoded)}} if part.get("type") == "image_url"
                 else part for part in content]
        converted.append({**message, "content": parts})
    return converted


def _with_decoded_images(message: dict) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if part.get("type") == "image" and "url" in part:
            if isinstance(part["url"], str):  # not loaded by handle_request: never passed on to be read
                raise InvalidRequest("an image part was not checked by the server", "messages")
            part = {"type": "image", "image": part["url"]}
        parts.append(part)
    return {**message, "content": parts}


__all__ = ["InternVLXChatCompletionHandler"]
