"""`internvlx tokens`, `bench` and `card` on an InternVL3.5-Flash folder (the tiny converted fixture, random weights
whose router compresses most tiles of real photos): `tokens` runs the router on each image and prices what the LLM
gets against the router off, or bounds a size it cannot route; `bench` measures the folder against its router off and
says what the router kept of the prompt; the card describes the router. The expected decisions come from the model's
own `model.model.route` on the whole loaded model, the token counts from 64 / 256 per tile, never from the helpers
under test."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image

import golden
from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
from internvlx_hf.cli import main
from internvlx_hf.token_budget import LLMShape, prefill_flops

from conftest import REPO_ROOT

IMAGES = ("image1.jpg", "image2.jpg", "img6.jpg")
TEXT = 64  # the default --text-tokens
FULL, SMALL = 256, 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from internvlx_hf.conversion import convert

    dst = tmp_path_factory.mktemp("flash_cli") / "converted"
    convert(golden.fixture_path(golden.FLASH_FIXTURE, "config.json").parent, dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def model(folder):
    return InternVLXForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(folder):
    return InternVLXProcessor.from_pretrained(folder)


def image_path(name: str) -> str:
    return str(golden.fixture_path("images", name))


def routed(model, processor, name: str, **options):
    """The model's own decisions on ``name`` alone in a prompt, and the length of the prompt it shortens to."""
    inputs = processor(images=[Image.open(image_path(name))], text="<image>", return_tensors="pt", **options)
    with torch.no_grad():
        routing = model.model.route(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    return routing.compressed.tolist(), routing.scores.tolist(), int(routing.input_ids.shape[1])


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_tokens_routes_each_image_and_prices_it_against_the_router_off(folder, model, processor, capsys):
    code, out, err = run(["tokens", str(folder), *[a for name in IMAGES for a in ("--image", image_path(name))],
                          "--tiling", "ratio", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    rows, summary = data["rows"], data["summary"]
    shape = LLMShape.from_text_config(model.config.get_text_config())
    assert [row["image"] for row in rows] == [image_path(name) for name in IMAGES]
    counts = []
    for name, row in zip(IMAGES, rows):
        compressed, scores, routed_length = routed(model, processor, name)
        tiles, count = len(compressed), sum(compressed)
        counts.append((tiles, count))
        llm = TEXT + 2 + count * SMALL + (tiles - count) * FULL
        off = TEXT + 2 + tiles * FULL
        assert row["decided"] is True and row["tiling"] == "ratio"
        assert (row["tiles"], row["tiles_compressed"], row["compressed"]) == (tiles, count, compressed), name
        assert row["scores"] == pytest.approx(scores, abs=1e-6)
        assert row["llm_tokens"] == llm == TEXT + routed_length  # the prompt the model itself shortened to
        assert (row["llm_tokens_bounds"], row["tiles_compressed_bounds"]) == ([llm, llm], [count, count])
        assert (row["image_tokens"], row["router_off_image_tokens"]) == (llm - TEXT - 2, tiles * FULL)
        assert row["router_off_llm_tokens"] == row["vllm_prompt_tokens"] == off  # vLLM checks the prompt as sent
        assert row["prefill_flops"] == prefill_flops(shape, llm)
        assert row["router_off_prefill_flops"] == prefill_flops(shape, off)
    # the fixture's router is not trivial on these photos: it compresses some tiles and keeps others
    assert all(count > 0 for _, count in counts) and any(count < tiles for tiles, count in counts)
    tiles, compressed = sum(t for t, _ in counts), sum(c for _, c in counts)
    image_tokens = sum(c * SMALL + (t - c) * FULL for t, c in counts)
    llm_tokens = sum(TEXT + 2 + c * SMALL + (t - c) * FULL for t, c in counts)
    off_tokens = sum(TEXT + 2 + t * FULL for t, _ in counts)
    [entry] = summary
    assert (entry["tiling"], entry["images"], entry["size_only"]) == ("ratio", 3, 0)
    assert (entry["tiles"], entry["tiles_compressed"]) == (tiles, compressed)
    assert entry["compressed_share"] == pytest.approx(compressed / tiles)
    assert entry["compressed_share_per_image"] == pytest.approx([min(c / t for t, c in counts),
                                                                 max(c / t for t, c in counts)])
    assert entry["image_tokens_kept"] == pytest.approx(image_tokens / (tiles * FULL))
    assert (entry["llm_tokens"], entry["router_off_llm_tokens"]) == (llm_tokens, off_tokens)
    assert entry["llm_tokens_kept"] == pytest.approx(llm_tokens / off_tokens)

    # the table says the same
    code, out, err = run(["tokens", str(folder), *[a for name in IMAGES for a in ("--image", image_path(name))],
                          "--tiling", "ratio"], capsys)
    assert code == 0, err
    assert "a tile enters the LLM as 64 tokens when its score p0 is above the 0.1 quantile of its image's tiles' " \
           "scores and >= 0.5, else as 256; routed on cpu in float32 (vision tower + router; the LLM is not run)" in out
    # what bounds the prompt on vLLM, which serves the router (vllm/processing.py checks the prompt as sent)
    assert "vLLM: checks the prompt as sent, every tile in full (the router-off count, JSON: vllm_prompt_tokens), " \
           "against --max-model-len when a request arrives" in out
    for name, (t, c) in zip(IMAGES, counts):
        llm = TEXT + 2 + c * SMALL + (t - c) * FULL
        assert f"| {image_path(name)} | ratio | {c}/{t} | {llm} | {TEXT + 2 + t * FULL} |" in out
    assert (f"ratio tiling, 3 images: {compressed} of {tiles} tiles compressed ({compressed / tiles:.1%}; per image "
            f"{min(c / t for t, c in counts):.1%} to {max(c / t for t, c in counts):.1%}); kept "
            f"{image_tokens / (tiles * FULL):.1%} of the image tokens ({image_tokens} of {tiles * FULL}), "
            f"{llm_tokens / off_tokens:.1%} of the LLM tokens") in out


def test_tokens_routes_each_tiling_on_its_own_tiles(folder, model, processor, capsys):
    code, out, err = run(["tokens", str(folder), "--image", image_path("image1.jpg"), "--tiling", "edge",
                          "--tiling", "area", "--max-tiles", "6", "--text-tokens", "10", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    for row, tiling in zip(rows, ("edge", "area")):
        compressed, _, routed_length = routed(model, processor, "image1.jpg", tiling=tiling, max_tiles=6)
        assert (row["tiling"], row["compressed"]) == (tiling, compressed)
        assert row["llm_tokens"] == 10 + routed_length


def test_tokens_of_a_size_give_the_routers_bounds(folder, model, capsys):
    code, out, err = run(["tokens", str(folder), "--image", "1024x768", "--image", "448x448", "--tiling", "ratio",
                          "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    big, one = data["rows"]
    shape = LLMShape.from_text_config(model.config.get_text_config())
    # 13 tiles (4x3 + the thumbnail): at most those strictly above the 0.1 quantile, 13 - 1 - floor(0.1 * 12) = 11
    most = 13 - 1 - math.floor(0.1 * 12)
    assert (big["tiles"], big["decided"], big["tiles_compressed"], big["compressed"]) == (13, False, None, None)
    assert big["tiles_compressed_bounds"] == [0, most] == [0, 11]
    low, high = TEXT + 2 + most * SMALL + (13 - most) * FULL, TEXT + 2 + 13 * FULL
    assert big["llm_tokens"] is None and big["llm_tokens_bounds"] == [low, high]
    assert big["router_off_llm_tokens"] == high
    assert big["prefill_flops_bounds"] == [prefill_flops(shape, low), prefill_flops(shape, high)]
    # one tile is its own quantile: never compressed
    assert (one["tiles"], one["tiles_compressed_bounds"], one["llm_tokens_bounds"]) == (1, [0, 0], [322, 322])
    assert data["summary"] == [{"tiling": "ratio", "images": 0, "size_only": 2}]
    code, out, err = run(["tokens", str(folder), "--image", "1024x768", "--tiling", "ratio"], capsys)
    assert code == 0, err
    assert f"| 1024x768 | ratio | 0..11 of 13 (size only) | {low}..{high} | {high} |" in out
    assert "size only (1024x768): no pixels, so no decisions" in out


def test_tokens_of_a_folder_whose_router_is_off(folder, tmp_path, capsys):
    off = tmp_path / "off"
    shutil.copytree(folder, off)
    config = json.loads((off / "config.json").read_text())
    config["vir"]["enabled"] = False
    (off / "config.json").write_text(json.dumps(config))
    code, out, err = run(["tokens", str(off), "--image", image_path("image1.jpg"), "--image", "1024x768",
                          "--tiling", "ratio", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["decided"], r["tiles_compressed"], r["llm_tokens"]) for r in rows] == [
        (True, 0, TEXT + 2 + 13 * FULL), (True, 0, TEXT + 2 + 13 * FULL)]


def test_the_router_is_loaded_without_the_llm_and_decides_as_the_whole_model(folder, model, processor):
    from internvlx_hf import InternVLXConfig
    from internvlx_hf.token_budget import load_router

    router = load_router(folder, InternVLXConfig.from_pretrained(folder))
    assert all(p.is_meta for p in router.language_model.parameters())
    assert not any(p.is_meta for p in router.vision_tower.parameters())
    inputs = processor(images=[Image.open(image_path("image2.jpg"))], text="<image>", return_tensors="pt")
    with torch.no_grad():
        mine = router.route(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
        whole = model.model.route(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    assert torch.equal(mine.compressed, whole.compressed) and torch.equal(mine.scores, whole.scores)


def test_tokens_router_options_and_help(folder, capsys):
    code, out, err = run(["tokens", str(REPO_ROOT / "src" / "internvlx_hf" / "demo" / "model"), "--image",
                          "800x600", "--dtype", "bfloat16"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("internvlx tokens: error: --device and --dtype choose where an InternVL3.5-Flash MODEL's "
                          "router runs;") and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main(["tokens", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tiles - 1 - floor(q * (tiles - 1))" in text and "config.vir.enabled = False" in text


def bench_prompt_routing(model, text_tokens: int, pixel_values):
    """What the router makes of the bench's prompt: text_tokens of text around the tiles (`variants.sample`)."""
    ids = torch.cat([torch.full((8,), 3), torch.full((FULL * pixel_values.shape[0],), model.config.image_token_id),
                     torch.full((text_tokens - 8,), 3)])[None]
    with torch.no_grad():
        routing = model.model.route(ids, pixel_values)
    return int(routing.compressed.sum()), int(routing.input_ids.shape[1])


def test_bench_prefill_times_the_router_against_its_router_off(folder, model, processor, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run(["bench", "prefill", str(folder), "--image", image_path("img6.jpg"), "--text-tokens", "16",
                          "--warmup", "0", "--repeats", "1", "--quiet", "--out", str(out_json)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["variant", "tokens_per_tile", "prompt_tokens", "compressed", "llm_tokens", "median_s",
                                "interval_s", "vs_router-off", "vs_router-off", "interval"]
    pixel_values = processor.image_processor(images=[Image.open(image_path("img6.jpg"))],
                                             return_tensors="pt")["pixel_values"]
    tiles = pixel_values.shape[0]
    compressed, llm_tokens = bench_prompt_routing(model, 16, pixel_values)
    assert llm_tokens == 16 + compressed * SMALL + (tiles - compressed) * FULL and 0 < compressed < tiles
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert data["settings"]["variants"] == ["this", "router-off"] and data["settings"]["tiles"] == tiles
    assert [(r["variant"], r["tiles"], r["tiles_compressed"], r["llm_tokens"], r["prompt_tokens"]) for r in rows] == [
        ("this", tiles, compressed, llm_tokens, 16 + tiles * FULL),
        ("router-off", tiles, 0, 16 + tiles * FULL, 16 + tiles * FULL)]
    assert rows[1]["vs_router-off"] == 1.0 and rows[1]["within_noise"] is None
    assert [line.split()[:5] for line in lines[2:4]] == [
        ["this", "256", str(16 + tiles * FULL), f"{compressed}/{tiles}", str(llm_tokens)],
        ["router-off", "256", str(16 + tiles * FULL), f"0/{tiles}", str(16 + tiles * FULL)]]
    assert (f"router (this): {compressed} of {tiles} tiles compressed (p0 above the 0.1 quantile of the tiles' scores "
            f"and >= 0.5); the LLM got {llm_tokens} tokens") in lines
    assert lines[4].startswith(f"tiles: {tiles} ({image_path('img6.jpg')} (398x180) through the folder's processor")


def test_bench_train_step_and_memory_on_noise_tiles(folder, model, tmp_path, capsys):
    from internvlx_hf.bench.variants import sample

    expected = bench_prompt_routing(model, 16, sample(model, 3, 16, "cpu")["pixel_values"])
    out_json = tmp_path / "t.json"
    code, out, err = run(["bench", "train-step", str(folder), "--tiles", "3", "--text-tokens", "16", "--warmup", "0",
                          "--repeats", "1", "--quiet", "--out", str(out_json)], capsys)
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["variant"], r["tiles_compressed"], r["llm_tokens"]) for r in rows] == [
        ("this", *expected), ("router-off", 0, 16 + 3 * FULL)]
    assert "the tiles are seeded noise, not an image" in out
    out_json = tmp_path / "m.json"
    code, out, err = run(["bench", "memory", str(folder), "--tiles", "3", "--text-tokens", "16", "--workload",
                          "prefill", "--quiet", "--out", str(out_json)], capsys)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["variant", "workload", "compressed", "llm_tokens", "workload_mib",
                                           "weights_mib", "peak_mib", "measure"]
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["variant"], r["tiles_compressed"], r["llm_tokens"]) for r in rows] == [
        ("this", *expected), ("router-off", 0, 16 + 3 * FULL)]
    assert all(r["workload_mib"] > 0 for r in rows)


@pytest.mark.parametrize("where, argv, message", [
    ("flash", ["--variants", "this,plain-1024"], "--variants plain-1024: {folder} is an InternVL3.5-Flash folder, whose "
                                                 "variants are this and router-off"),
    ("flash", ["--variants", "plain-256"], "plain-256 and plain-1024 measure LVTC, which it has not"),
    ("plain", ["--variants", "this,router-off"], "--variants router-off: {folder} has no router"),
    ("flash", ["--tiles", "2", "--image", "IMAGE"], "--tiles and --image: the image's tiles are what the folder's "
                                                     "processor makes of it"),
])
def test_bench_refuses_variants_that_do_not_fit_the_folder(folder, capsys, where, argv, message):
    target = folder if where == "flash" else REPO_ROOT / "src" / "internvlx_hf" / "demo" / "model"
    argv = [image_path("img6.jpg") if a == "IMAGE" else a for a in argv]
    code, out, err = run(["bench", "prefill", str(target), *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("internvlx bench: error: ") and len(err.strip().splitlines()) == 1, err
    assert message.format(folder=target) in err


def test_bench_help_names_the_router_variant(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "prefill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "router-off" in text and "an InternVL3.5-Flash folder: this,router-off" in text


def test_card_describes_the_router(folder, model):
    from internvlx_hf.hub import build_model_card

    card = build_model_card(folder, license="apache-2.0")
    text = card.content
    assert {"internvl3.5-flash", "vir"} <= set(card.data.tags)
    assert "## Visual resolution router (InternVL3.5-Flash)" in text
    assert "| router | on (`config.vir.enabled`, the reference's `flash_mode`) |" in text
    assert ("| compressed when | `p0` > the 0.1 quantile of its sample's tiles' scores (`relative_threshold`, "
            "`torch.quantile`) and `p0` >= 0.5 (`absolute_threshold`) |") in text
    assert "| quantile scope | `sample`: the quantile over the tiles of each sample" in text
    assert "| tokens per tile | 256, or 64 when compressed |" in text
    assert "`model.config.vir.enabled = False` runs this checkpoint as plain InternVL3.5, every tile 256 tokens" in text
    assert "`generate_flash` in the official InternVL3.5-Flash code) takes one sample per call" in text
    # 1024x768 at the saved budget (12 tiles, ratio): 4x3 + the thumbnail; at most 11 compressed
    assert f"| 1024x768 | 13 | 0 to 11 | {11 * SMALL + 2 * FULL} to {13 * FULL} | {13 * FULL} |" in text
    assert "| 448x448 | 1 | 0 | 256 | 256 |" in text
    # a non-Flash card has no such section
    plain = build_model_card(REPO_ROOT / "src" / "internvlx_hf" / "demo" / "model", license="mit").content
    assert "Visual resolution router" not in plain and "vir.enabled" not in plain


def test_the_guides_prefill_figures_are_those_of_the_committed_results_file():
    """docs/flash.md's transformers prefill figures come from the file its command wrote
    (`benchmarks/results/flash-prefill-transformers.json`), rounded as printed there."""
    from conftest import REPO_ROOT

    results = json.loads((REPO_ROOT / "benchmarks" / "results" / "flash-prefill-transformers.json").read_text())
    rows = {row["variant"]: row for row in results["rows"]}
    this, off = rows["this"], rows["router-off"]
    guide = " ".join((REPO_ROOT / "docs" / "flash.md").read_text(encoding="utf-8").split())
    rounds = results["settings"]["rounds"]
    assert (f"median {this['median_s']:.3f} s against {off['median_s']:.3f} s with the router off, a ratio of "
            f"{this['vs_router-off']:.3f} (the median of {rounds} interleaved rounds' ratios; 95% interval of that "
            f"median {this['vs_router-off_low']:.3f}-{this['vs_router-off_high']:.3f})") in guide
    assert f"({this['llm_tokens']:,} of {off['llm_tokens']:,})" in guide
    assert "--out benchmarks/results/flash-prefill-transformers.json" in guide
