"""The clients users evaluate with, called the way they call a model: the generic Hugging Face VLM path of lmms-eval's
`huggingface` chat model (and similar harnesses), transformers' `pipeline("image-text-to-text")`, and InternVL2's
`model.chat()` as VLMEvalKit's and lmms-eval's InternVL2 classes call it, on the demo model and on a converted
checkpoint. None of these clients sends a system turn; the demo model must answer its questions anyway.

The harnesses themselves are not installed here (lmms-eval pulls a CUDA torch); the calls below are theirs, step by
step (lmms-eval 0.7.3 `lmms_eval/models/chat/huggingface.py`, `lmms_eval/models/simple/internvl2.py`, VLMEvalKit
`vlmeval/vlm/internvl/internvl_chat.py`)."""

from __future__ import annotations

import json

import golden
import pytest
import torch
import yaml
from conftest import REPO_ROOT, load_script, require_fixture, run_isolated_python
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    pipeline,
)

from internvlx_hf.conversion import convert
from internvlx_hf.demo import demo_model_dir, demo_samples
from internvlx_hf.processing import InternVLXImageProcessor

# `internvlx demo`'s questions: its synthetic images of seeds 0 and 1, one per task.
QUESTIONS = demo_samples(seed=0) + demo_samples(seed=1)
# The demo model as clients get it (`internvlx demo --save`): its files plus the package's remote code.
DEMO = str(demo_model_dir())


def right(answers: list[str]) -> int:
    assert len(answers) == len(QUESTIONS)
    return sum(answer.strip() == sample.expected for answer, sample in zip(answers, QUESTIONS))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The InternVL2 (Qwen2) fixture converted with the defaults: 448 px tiles, random weights."""
    folder = tmp_path_factory.mktemp("clients") / "converted"
    convert(require_fixture("internvl2_qwen2"), folder, progress=False)
    return str(folder)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-images")
    paths = []
    for index, sample in enumerate(QUESTIONS):
        paths.append(str(folder / f"{index}_{sample.task}.png"))
        sample.image.save(paths[-1])
    return paths


# ------------------------------------------------------------------------ the generic Hugging Face VLM path


def load_like_lmms_eval(folder: str):
    """lmms-eval's `huggingface` model: the Auto class its config maps to, bfloat16, the folder's processor and
    tokenizer (the tokenizer's eos and pad ids go to `generate`)."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if config.model_type in AutoModelForCausalLM._model_mapping.keys():
        model_class = AutoModelForCausalLM
    elif config.model_type in AutoModelForImageTextToText._model_mapping.keys():
        model_class = AutoModelForImageTextToText
    else:
        model_class = AutoModel
    model = model_class.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return model, processor, tokenizer


def generic_answers(model, processor, tokenizer, images, questions, batch_size: int, max_new_tokens: int = 8):
    """One user turn per question (the image, then the text), no system turn; batches padded by the processor."""
    answers, padded = [], False
    for start in range(0, len(questions), batch_size):
        batch = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q}]}]
                 for image, q in zip(images[start:start + batch_size], questions[start:start + batch_size])]
        texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        inputs = processor(text=texts, images=images[start:start + batch_size], videos=[], padding=True,
                           return_tensors="pt")
        padded |= bool((inputs["attention_mask"][:, 0] == 0).any())
        with torch.inference_mode():
            out = model.generate(**inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        trimmed = [o[len(i):] for i, o in zip(inputs["input_ids"], out)]
        answers += processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return answers, padded


@pytest.fixture(scope="module")
def demo_generic():
    return load_like_lmms_eval(DEMO)


@pytest.mark.parametrize("images_as", ["PIL", "paths"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_generic_path_answers_the_demo_questions_without_a_system_turn(demo_generic, image_paths, images_as,
                                                                       batch_size):
    model, processor, tokenizer = demo_generic
    assert tokenizer.eos_token == "<|im_end|>"  # lmms-eval stops at the tokenizer's eos: the end of the turn
    images = [s.image for s in QUESTIONS] if images_as == "PIL" else image_paths
    answers, padded = generic_answers(model, processor, tokenizer, images, [s.question for s in QUESTIONS],
                                      batch_size)
    assert padded == (batch_size > 1)  # questions of different lengths, left-padded in one batch
    assert right(answers) == 10, answers


def test_no_system_turn_renders_the_default_system_message(demo_generic):
    """What every client without a system turn sends; the demo model was trained on it (and on an empty one)."""
    from internvlx_hf.demo.recipe import template_default_system

    _, processor, _ = demo_generic
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    default = template_default_system(processor)
    assert default == golden.model_reference("internvl2_qwen2").meta["system_message"]
    prompt = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert prompt == (f"<|im_start|>system\n{default}<|im_end|><|im_start|>user\n<image>\nHow many shapes?"
                      "<|im_end|><|im_start|>assistant\n")


def test_generic_path_on_a_converted_checkpoint_is_internvl2s_chat(converted):
    """Without a system turn the generic path sends InternVL2's chat() prompt: float32 greedy tokens are the
    reference's; bfloat16 batches of 4 (PIL images and paths) run."""
    reference = golden.model_reference("internvl2_qwen2")
    model, processor, tokenizer = load_like_lmms_eval(converted)
    model.float()
    answers, _ = generic_answers(model, processor, tokenizer, [str(reference.image)], [reference.question], 1)
    expected = reference.meta["generation"]["generated_ids"]
    assert answers == [tokenizer.decode(expected, skip_special_tokens=True)]
    inputs = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": reference.question}]}],
        tokenize=False, add_generation_prompt=True)], images=[str(reference.image)], return_tensors="pt")
    assert inputs["input_ids"].shape[1] == reference.meta["input_len"]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == expected

    model.to(torch.bfloat16)
    photos = [reference.image, require_fixture("images", "image1.jpg"), require_fixture("images", "image2.jpg")]
    images = [Image.open(photos[0]).convert("RGB"), str(photos[1]), Image.open(photos[2]).convert("RGB"),
              str(photos[0])]
    answers, padded = generic_answers(model, processor, tokenizer, images,
                                      ["What is this?", "Describe it.", "Any text?", "Colours?"], 4, max_new_tokens=3)
    assert padded and len(answers) == 4 and all(isinstance(a, str) for a in answers)


# ------------------------------------------------------------------------------------------------- the pipeline


def pipeline_answers(pipe, images, batch_size: int, max_new_tokens: int = 8) -> list[str]:
    chats = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": s.question}]}]
             for image, s in zip(images, QUESTIONS)]
    out = pipe(text=chats, batch_size=batch_size, max_new_tokens=max_new_tokens, return_full_text=False)
    return [result[0]["generated_text"] for result in out]


@pytest.fixture(scope="module")
def demo_pipeline():
    return pipeline("image-text-to-text", model=DEMO, trust_remote_code=True, dtype=torch.bfloat16)


@pytest.mark.parametrize("images_as", ["PIL", "paths"])
def test_pipeline_answers_the_demo_questions_without_a_system_turn(demo_pipeline, image_paths, images_as):
    images = [s.image for s in QUESTIONS] if images_as == "PIL" else image_paths
    answers = pipeline_answers(demo_pipeline, images, batch_size=4)
    assert right(answers) == 10, answers
    # the full-text form returns the conversation with the reply appended as an assistant turn
    full = demo_pipeline(text=[{"role": "user", "content": [{"type": "image", "image": images[0]},
                                                            {"type": "text", "text": QUESTIONS[0].question}]}],
                         max_new_tokens=8)
    assert full[0]["generated_text"][-1] == {"role": "assistant", "content": answers[0]}


def test_pipeline_runs_on_a_converted_checkpoint(converted):
    pipe = pipeline("image-text-to-text", model=converted, trust_remote_code=True, dtype=torch.bfloat16)
    image = str(golden.model_reference("internvl2_qwen2").image)
    out = pipe(text=[[{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": q}]}] for q in ("Hi?", "What is it?")],
               batch_size=2, max_new_tokens=3, return_full_text=False)
    assert [len(result) for result in out] == [1, 1]
    assert all(isinstance(result[0]["generated_text"], str) for result in out)


# ------------------------------------------------------------------------------- InternVL2's chat() API


def internvl2_tiles(image) -> torch.Tensor:
    """Tiles as InternVL2's `load_image` makes them in the harnesses: 448 px, ratio matching, up to 6 tiles and a
    thumbnail (our image processor reproduces it bit for bit: tests/test_image_processing.py)."""
    processor = InternVLXImageProcessor(image_size=448, max_tiles=6, tiling="ratio")
    return processor(image, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def demo_chat():
    model = AutoModel.from_pretrained(DEMO, trust_remote_code=True, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO, trust_remote_code=True, use_fast=False)  # VLMEvalKit's call
    return model, tokenizer


def test_chat_answers_the_demo_questions_as_the_harnesses_call_it(demo_chat):
    model, tokenizer = demo_chat
    lmms_eval, vlmevalkit = [], []
    for sample in QUESTIONS:
        pixel_values = internvl2_tiles(sample.image).to(torch.bfloat16)
        assert pixel_values.shape == (1, 3, 448, 448)  # the demo model's tiles are 112 px: chat() resizes them
        # lmms-eval's internvl2: "<image>\n" + question, its generation kwargs, the history returned
        answer, history = model.chat(tokenizer, pixel_values, "<image>\n" + sample.question,
                                     dict(num_beams=1, max_new_tokens=1024, do_sample=False),
                                     num_patches_list=[pixel_values.size(0)], history=None, return_history=True)
        assert history == [("<image>\n" + sample.question, answer)]
        lmms_eval.append(answer)
        # VLMEvalKit's InternVLChat (V2.0): the bare question, keyword arguments
        vlmevalkit.append(model.chat(tokenizer, pixel_values=pixel_values, num_patches_list=[1],
                                     question=sample.question,
                                     generation_config=dict(do_sample=False, max_new_tokens=4096, top_p=None)))
    assert right(lmms_eval) == 10, lmms_eval
    assert right(vlmevalkit) == 10, vlmevalkit


def test_chat_writes_the_models_system_message(demo_chat):
    """VLMEvalKit sets `model.system_message` for its system prompts, as InternVL2's chat() reads it."""
    model, tokenizer = demo_chat
    question = "<image>\nHow many shapes?"
    default = model._chat_prompt(tokenizer, question, None, [1])
    assert default.startswith("<|im_start|>system\n你是由上海人工智能实验室")
    try:
        model.system_message = ""
        assert model._chat_prompt(tokenizer, question, None, [1]).startswith(
            "<|im_start|>system\n<|im_end|><|im_start|>user\n<img>")
        pixel_values = internvl2_tiles(QUESTIONS[3].image).to(torch.bfloat16)
        assert model.chat(tokenizer, pixel_values, QUESTIONS[3].question, dict(max_new_tokens=8)) == \
            QUESTIONS[3].expected
    finally:
        del model.system_message
    assert model._chat_prompt(tokenizer, question, None, [1]) == default


def test_chat_resizes_tiles_only_when_they_are_not_the_models(demo_chat):
    model, _ = demo_chat
    tiles = internvl2_tiles(QUESTIONS[0].image)
    small = torch.nn.functional.interpolate(tiles, size=(112, 112), mode="bicubic", antialias=True)
    assert torch.equal(model._chat_tiles(tiles), small.to(torch.bfloat16))
    assert torch.equal(model._chat_tiles(small), small.to(torch.bfloat16))


def test_chat_on_a_converted_checkpoint_is_the_reference_answer(converted):
    reference = golden.model_reference("internvl2_qwen2")
    model = AutoModel.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted, trust_remote_code=True, use_fast=False)
    pixel_values = internvl2_tiles(str(reference.image))
    assert torch.equal(pixel_values, reference.pixel_values())
    answer, history = model.chat(tokenizer, pixel_values, "<image>\n" + reference.question,
                                 dict(num_beams=1, max_new_tokens=8, do_sample=False),
                                 num_patches_list=[pixel_values.size(0)], history=None, return_history=True)
    assert answer == reference.chat_response
    model.to(torch.bfloat16)
    assert isinstance(model.chat(tokenizer, pixel_values.to(torch.bfloat16), reference.question,
                                 dict(max_new_tokens=3, do_sample=False, top_p=None)), str)


# ---------------------------------------------------------------------------- loglikelihood requests


def test_the_model_scores_continuations_for_loglikelihood_requests(demo_generic):
    """lmms-eval's loglikelihood requests (multiple-choice tasks) need log p(continuation | context) and whether the
    continuation is the greedy one, from one forward pass's logits. Its generic `huggingface` class raises
    NotImplementedError for them itself (and lmms-eval 0.7.3 builds none for chat models); the model supports them:
    the most likely reply of each task's choices is the greedy one, and the right one for all 10 questions (as
    generate() answers them)."""
    from internvlx_hf.training.synthetic_vqa import COLOURS, GLYPHS, POSITIONS, SHAPES

    model, processor, _ = demo_generic
    model.float()
    try:
        choices = {"colour": list(COLOURS), "shape": list(SHAPES), "position": [p for row in POSITIONS for p in row],
                   "count": [str(n) for n in range(1, 7)], "fine": list(GLYPHS)[:8]}
        chosen = []
        for sample in QUESTIONS:
            context = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}],
                tokenize=False, add_generation_prompt=True)
            scores = {}
            for choice in choices[sample.task]:
                # the whole reply, its end of turn included: "bottom" is a prefix of "bottom-right"
                inputs = processor(text=[context + choice + "<|im_end|>"], images=[sample.image], return_tensors="pt")
                n_context = processor(text=[context], images=[sample.image], return_tensors="pt")["input_ids"].shape[1]
                with torch.inference_mode():
                    logits = model(**inputs).logits.float()
                targets = inputs["input_ids"][0, n_context:]
                logprobs = logits[0, n_context - 1:-1].log_softmax(-1)
                scores[choice] = (logprobs.gather(-1, targets[:, None]).sum().item(),
                                  bool((logprobs.argmax(-1) == targets).all()))
            best = max(scores, key=lambda c: scores[c][0])
            assert scores[best][1], (sample.question, scores)  # the most likely reply is the one generate() gives
            chosen.append(best)
        assert right(chosen) == 10, chosen
    finally:
        model.to(torch.bfloat16)


# ------------------------------------------------------------------------------ without the package installed


def test_the_demo_folder_works_in_the_clients_without_the_package(tmp_path, image_paths):
    script = (REPO_ROOT / "scripts" / "remote_code_answers.py").read_text()
    question = json.dumps([str(DEMO), image_paths, [s.question for s in QUESTIONS], True, "bfloat16"])
    proc = run_isolated_python(script, tmp_path, args=[question])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT"))
    assert len(result["modules"]) == 3
    assert all(module.startswith("transformers_modules.") for module in result["modules"]), result["modules"]
    assert right(result["generate"]) == 10, result["generate"]
    assert right(result["pipeline"]) == 10, result["pipeline"]


# ------------------------------------------------------------------------------ lmms-eval's offline task


def test_the_lmms_eval_example_task_is_the_held_out_set_and_the_demo_model_passes_it(tmp_path, demo_generic):
    """examples/lmms_eval_task.py writes a task lmms-eval runs offline (`--include_path`); its documents, read with
    the task's own functions and asked through the generic path, are the demo recipe's held-out questions."""
    from datasets import load_from_disk

    from internvlx_hf.training.synthetic_vqa import TASKS, iter_samples

    example = load_script("examples/lmms_eval_task.py")
    task = example.write_task(tmp_path, n=10)
    config = yaml.load((task / "internvlx_demo.yaml").read_text(), Loader=_LmmsEvalYamlLoader)
    assert config["dataset_path"] == str(tmp_path / "data") and config["dataset_kwargs"] == {"load_from_disk": True}
    assert (config["task"], config["output_type"], config["test_split"]) == ("internvlx_demo", "generate_until", "test")
    assert config["generation_kwargs"]["max_new_tokens"] == 8 and config["doc_to_target"] == "answer"
    docs = load_from_disk(config["dataset_path"])["test"]
    held_out = [sample for _, _, sample in iter_samples(10, tasks=TASKS, seed=999_999, image_size=112)]
    assert docs["question"] == [s.question for s in held_out] and docs["answer"] == [s.answer for s in held_out]

    utils = load_script(task / "utils.py")
    model, processor, tokenizer = demo_generic
    images = [utils.doc_to_visual(doc)[0] for doc in docs]
    answers, _ = generic_answers(model, processor, tokenizer, images, [utils.doc_to_text(doc) for doc in docs], 4)
    scores = [utils.process_results(doc, [answer])["exact_match"] for doc, answer in zip(docs, answers)]
    assert sum(scores) == 10, answers
    assert utils.process_results(docs[0], [" " + docs[0]["answer"] + "\n"]) == {"exact_match": 1.0}
    assert utils.process_results(docs[0], ["no"]) == {"exact_match": 0.0}


class _LmmsEvalYamlLoader(yaml.SafeLoader):
    """lmms-eval's task YAML marks functions with `!function module.name`; read them as their names."""


_LmmsEvalYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
