"""What `internvlx serve` accepts in a chat-completions body, checked before transformers' server sees it.

`validate_chat_request` checks a body as OpenAI's API defines it (types, ranges, the roles and content parts
InternVL-X's chat templates render), so that every client mistake is a 4xx with OpenAI's error object (`error_body`)
instead of an exception in transformers' code (a 500); `check_text_fits` refuses a text that cannot fit the model's
context before the tokenizer spends time on it.

Everything here is plain Python (no FastAPI import), so it can be used and tested without the ``serve`` extra.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .limits import RequestLimits

#: A temperature below this is greedy decoding (vLLM's _SAMPLING_EPS): dividing logits by it overflows to inf.
GREEDY_BELOW = 1e-5
#: How many characters a tokenizer's normalizer may fold into one (Unicode composition: a Hangul syllable from three
#: jamo, a letter with two marks), so that characters / (this x the longest token) is a floor on the token count.
COMPOSITION_FACTOR = 4

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image_url")

# Chat-completions fields of OpenAI's API that transformers' server ignores (it logs a warning) and that change no
# answer: accepted with any value, as OpenAI clients send some of them by default.
_IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls",
                   "presence_penalty", "reasoning_effort", "web_search_options", "prediction")
# Fields a client may send only with the value that asks for nothing this server would silently drop.
_NEUTRAL_VALUES: dict[str, tuple[Any, str]] = {
    "n": ((None, 1), "this server returns one choice per request"),
    "logprobs": ((None, False), "this server does not return log probabilities"),
    "top_logprobs": ((None, 0), "this server does not return log probabilities"),
    "tools": ((None, []), "InternVL-X's chat templates have no tool calling"),
    "tool_choice": ((None, "none", "auto"), "InternVL-X's chat templates have no tool calling"),
    "functions": ((None, []), "InternVL-X's chat templates have no function calling"),
    "function_call": ((None, "none", "auto"), "InternVL-X's chat templates have no function calling"),
    "audio": ((None,), "this server answers with text only"),
    "modalities": ((None, ["text"]), "this server answers with text only"),
    "response_format": ((None, {"type": "text"}), "this server does not constrain the answer's format"),
}
# transformers' own extensions of the request, refused: each lets a client set any generation or processor option
# (beams, lengths, tile counts), which an exposed server must not take.
_REFUSED_FIELDS = {
    "generation_config": "sets any generation option of the server",
    "chat_template_kwargs": "sets any option of the chat template and the processor",
}
_FIELDS = {"model", "messages", "stream", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
           "seed", "frequency_penalty", "logit_bias", *_IGNORED_FIELDS, *_NEUTRAL_VALUES}


class InvalidRequest(Exception):
    """A client mistake: answered with ``status`` and OpenAI's error object (`error_body`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}`` (what OpenAI clients read into
    their exceptions), and FastAPI's ``detail`` with the same message."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}, "detail": message}


# --- the chat-completions body ---------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """How OpenAI's errors name a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _wrong_type(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.", param)


def _integer(body: dict, name: str, low: int, high: int | None, high_reason: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    if value < low:
        raise InvalidRequest(f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got "
                             f"{value} instead.", name)
    if high is not None and value > high:
        raise InvalidRequest(f"Invalid '{name}': integer above maximum value. Expected a value <= {high}"
                             f"{high_reason}, but got {value} instead.", name)
    return value


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False, reason: str = "") -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a number", value)
    if not math.isfinite(value):
        raise InvalidRequest(f"Invalid '{name}': expected a finite number, but got {value} instead.", name)
    if value < low or (low_open and value == low) or value > high:
        bounds = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise InvalidRequest(f"Invalid '{name}': expected a number {bounds}{reason}, but got {value} instead.", name)


def _check_content(content: Any, param: str, role: str, images: list) -> None:
    if isinstance(content, str) or (content is None and role == "assistant"):
        return
    if not isinstance(content, list):
        raise _wrong_type(param, "a string or an array of content parts", content)
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise _wrong_type(where, "an object", part)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise InvalidRequest(f"Missing or invalid '{where}.type': expected one of {', '.join(CONTENT_TYPES)}.",
                                 f"{where}.type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _wrong_type(f"{where}.text", "a string", part.get("text"))
        elif kind == "image_url":
            if role != "user":
                raise InvalidRequest(f"Invalid '{where}': image parts are only accepted in user messages, not in "
                                     f"{role} messages.", where)
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            url_param = f"{where}.image_url.url" if isinstance(image_url, dict) else f"{where}.image_url"
            if not isinstance(url, str) or not url:
                raise _wrong_type(url_param, "a non-empty string (a data:image/...;base64 URI, an http(s) URL or a "
                                             "file path)", url)
            detail = image_url.get("detail") if isinstance(image_url, dict) else None
            if detail not in (None, "auto", "low", "high"):
                raise InvalidRequest(f"Invalid '{where}.image_url.detail': expected 'auto', 'low' or 'high'.",
                                     f"{where}.image_url.detail")
            images.append((url, url_param))
        else:
            hint = " (video is not served: send frames as images)" if kind == "video_url" else ""
            raise InvalidRequest(f"Invalid '{where}.type': {kind!r} is not accepted; this server takes "
                                 f"{' and '.join(repr(name) for name in CONTENT_TYPES)} parts{hint}.", f"{where}.type")


def _check_messages(messages: Any, limits: RequestLimits) -> list[tuple[str, str]]:
    """The messages' image URLs with the param that names each, after checking every message."""
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of messages", messages)
    if not messages:
        raise InvalidRequest("Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
                             "empty array instead.", "messages")
    images: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _wrong_type(param, "an object", message)
        role = message.get("role")
        if role not in ROLES:
            shown = repr(role) if isinstance(role, str) else _kind(role)
            raise InvalidRequest(f"Invalid '{param}.role': {shown[:50]}; InternVL-X's chat templates take 'system' "
                                 "(the first message only), 'user' and 'assistant'.", f"{param}.role")
        if role == "system" and index > 0:
            raise InvalidRequest(f"Invalid '{param}.role': 'system' is only accepted as the first message.",
                                 f"{param}.role")
        if "content" not in message and role != "assistant":
            raise InvalidRequest(f"Missing required parameter: '{param}.content'.", f"{param}.content")
        if message.get("tool_calls") not in (None, []):
            raise InvalidRequest(f"Invalid '{param}.tool_calls': InternVL-X's chat templates have no tool calling.",
                                 f"{param}.tool_calls")
        _check_content(message.get("content"), f"{param}.content", role, images)
    if len(images) > limits.max_images_per_request:
        raise InvalidRequest(f"Too many images: {len(images)}; this server accepts at most "
                             f"{limits.max_images_per_request} per request (--max-images-per-request).", "messages")
    return images


def _check_unicode(body: dict) -> None:
    """Every string of the body (keys too) is valid Unicode: JSON's escapes can carry a lone surrogate
    (``"\\ud800"``), which Python's json module accepts and the tokenizer, the file system and UTF-8 cannot take."""
    pending: list[tuple[Any, str]] = [(body, "")]
    while pending:  # iterative: a deeply nested value must not exhaust the stack
        value, param = pending.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                pending.append((key, param))
                pending.append((child, f"{param}.{key}" if param else str(key)))
        elif isinstance(value, list):
            pending.extend((child, f"{param}[{index}]") for index, child in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                shown = param[:200].encode("utf-8", "replace").decode() or None
                raise InvalidRequest(f"Invalid string in {repr(shown) if shown else 'a field name'}: it is not valid "
                                     "Unicode (a lone surrogate such as \\ud800).", shown) from None


def validate_chat_request(body: Any, limits: RequestLimits) -> tuple[dict, list[tuple[str, str]]]:
    """A chat-completions body checked (`InvalidRequest` on the first mistake), ``max_completion_tokens`` copied
    to ``max_tokens`` (transformers before 5.20 reads only the latter), a temperature below `GREEDY_BELOW` made 0
    (greedy), ``logit_bias`` as floats (an empty one left out); and the images' (URL, param) pairs."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, got {_kind(body)}.")
    _check_unicode(body)
    for name in body:
        if name in _REFUSED_FIELDS:
            raise InvalidRequest(f"'{name}' is not accepted by this server: it {_REFUSED_FIELDS[name]}.", name)
        if name not in _FIELDS:
            raise InvalidRequest(f"Unrecognized request argument supplied: {str(name)[:100]}", str(name)[:100])
    for name, (neutral, reason) in _NEUTRAL_VALUES.items():
        value = body.get(name)
        if not any(type(value) is type(allowed) and value == allowed for allowed in neutral):
            raise InvalidRequest(f"Invalid '{name}': {json.dumps(body[name])[:100]}; {reason}.", name)
    images = _check_messages(body.get("messages"), limits)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _wrong_type("model", "a string", body["model"])
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise _wrong_type("stream", "a boolean", body["stream"])
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "frequency_penalty", -1, 2, low_open=True,
            reason=" (it becomes transformers' repetition_penalty = 1 + frequency_penalty, which must be > 0)")
    context = limits.max_context
    reason = " (the model's context length)" if context is not None else ""
    for name in ("max_tokens", "max_completion_tokens"):
        _integer(body, name, 1, context, reason)
    _integer(body, "seed", -2**63, 2**63 - 1)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(item, str) and item for item in stops):
            raise _wrong_type("stop", "a non-empty string or an array of non-empty strings", stop)
        if not 1 <= len(stops) <= 4:
            raise InvalidRequest(f"Invalid 'stop': expected 1 to 4 stop sequences, got {len(stops)}.", "stop")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise _wrong_type("logit_bias", "an object mapping token ids to biases", logit_bias)
        vocab = limits.vocab_size
        for token, bias in logit_bias.items():
            if not (token.isascii() and token.isdigit() and len(token) <= 12) or (vocab and int(token) >= vocab):
                raise InvalidRequest(f"Invalid 'logit_bias': key {token[:30]!r} is not a token id"
                                     f"{f' (0 to {vocab - 1})' if vocab else ''}.", "logit_bias")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise InvalidRequest(f"Invalid 'logit_bias': the bias of token {token} must be a number from -100 "
                                     "to 100.", "logit_bias")
    body = dict(body)
    if body.get("logit_bias") == {}:
        del body["logit_bias"]  # no bias (transformers' sequence_bias refuses an empty one)
    elif body.get("logit_bias") is not None:  # transformers' sequence_bias takes float biases only
        body["logit_bias"] = {token: float(bias) for token, bias in body["logit_bias"].items()}
    if body.get("temperature") is not None and 0 < body["temperature"] < GREEDY_BELOW:
        body["temperature"] = 0.0  # greedy, as vLLM does: sampling at such a temperature divides logits into inf/nan
    if body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body.pop("max_completion_tokens")
    body.pop("max_completion_tokens", None)
    return body, images


def _texts(messages: list[dict]) -> list[str]:
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part["text"] for part in content if part.get("type") == "text")
    return texts


def check_reserved_tags(messages: list[dict], tags: tuple[str, ...]) -> None:
    """Refuse (`InvalidRequest`, 400) a message text holding one of ``tags``, the strings the model reserves for
    image input (``<image>``, ``<video>``, ``<img>``, ``</img>``, ``<IMG_CONTEXT>``): the chat template and the
    processor would take it for an image placeholder and the prompt's image tokens would no longer match the images
    (an error deep in the processor, or a silently wrong prompt). The same rule and message as the chat templates'
    and so the vLLM route's (`chat_templates.reserved_tag_message`)."""
    if not tags:
        return
    # Deferred: `internvlx_hf.processing` imports transformers, and this module stays plain Python.
    from ..processing.chat_templates import reserved_tag_message

    for index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            texts = [(content, f"messages[{index}].content")]
        elif isinstance(content, list):
            texts = [(part["text"], f"messages[{index}].content[{number}].text")
                     for number, part in enumerate(content) if part.get("type") == "text"]
        else:
            continue
        for text, param in texts:
            for tag in tags:
                if tag in text:
                    raise InvalidRequest(reserved_tag_message(tag), param)


def check_text_fits(messages: list[dict], limits: RequestLimits) -> None:
    """Refuse (`InvalidRequest`, ``context_length_exceeded``) messages whose text alone cannot fit the model's
    context, before they are tokenized: no token spans more than ``limits.longest_token_chars`` characters (the
    vocabulary's longest token, as spelled in it: a byte-level or byte-fallback token is at least as long as the text
    it decodes to), nor more than `COMPOSITION_FACTOR` times that after the tokenizer's normalization; whitespace,
    which a normalizer may collapse, is not counted. Checked messages (`validate_chat_request`) only."""
    context, longest = limits.max_context, limits.longest_token_chars
    if context is None or not longest:
        return
    texts = _texts(messages)
    characters = sum(len(text) for text in texts)
    if characters < context:  # fits, whatever the tokenizer does
        return
    for blank in (" ", "\n", "\t", "\r", "\u3000", "\xa0"):
        characters -= sum(text.count(blank) for text in texts)
    floor = characters // (COMPOSITION_FACTOR * longest)
    if floor + 1 > context:
        raise InvalidRequest(
            f"This model's maximum context length is {context} tokens. However, the text of your messages alone is "
            f"at least {floor} tokens ({characters} characters other than spaces and line breaks; a token of this "
            f"model spans at most {longest}). Please reduce the length of the messages.", "messages",
            code="context_length_exceeded")


__all__ = ["COMPOSITION_FACTOR", "GREEDY_BELOW", "InvalidRequest", "check_reserved_tags", "check_text_fits",
           "error_body", "validate_chat_request"]
