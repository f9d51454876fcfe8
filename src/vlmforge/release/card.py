"""The release's model card (README.md), generated from the manifest only: no clock, no paths, so the same
manifest gives the same bytes."""

from __future__ import annotations

import json

from vlmforge.release.files import SUMS
from vlmforge.host.sizes import size_hw


def model_card(manifest: dict, name: str, *, has_genai: bool) -> str:
    """README.md for a release, from the manifest only (no clock, no paths): same manifest, same bytes."""
    parts = [_card_front_matter(manifest), _card_summary(manifest, name), _card_components(manifest)]
    if manifest.get("variant"):
        parts.append(_card_deviation(manifest["variant"]))
    parts += [_card_validation(manifest["validation"]), _card_usage(name, has_genai), _card_toolchain(manifest),
              _card_files()]
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value if value is not None else "-").replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _hub_id(checkpoint: str) -> str | None:
    parts = checkpoint.split("/")
    ok = len(parts) == 2 and all(parts) and ":" not in checkpoint and not checkpoint.startswith((".", "~"))
    return checkpoint if ok else None


def _card_front_matter(manifest: dict) -> str:
    lines = ["---", "library_name: onnx", "pipeline_tag: image-text-to-text",
             f"tags: [onnx, vlmforge, {manifest['family']}]"]
    base = _hub_id(manifest["source"]["checkpoint"])
    if base:
        lines.append(f"base_model: {base}")
    return "\n".join(lines + ["---"]) + "\n"


def _vision_rows(vision: dict) -> list[list]:
    """The card's rows on the image input: a fixed side, or a dynamic set's pixel budget."""
    if vision.get("vision") == "dynamic":
        pp = vision["preprocess"]
        factor = pp["patch_size"] * pp["merge_size"]
        return [["vision input", f"any size, aspect ratio kept: {pp['min_pixels']} to {pp['max_pixels']} pixels "
                                 f"(sides multiples of {factor})"],
                ["tokens per image", f"{pp['min_pixels'] // factor ** 2} to {pp['max_pixels'] // factor ** 2}"]]
    h, w = size_hw(vision["image_size"])
    fit = vision.get("preprocess", {}).get("fit")
    fitted = {"stretch": "stretched"}.get(fit, fit)
    return [["vision input", f"{h} x {w} px" + (f" (height x width; images of other sizes are {fitted} to it)" if fit else "")],
            ["tokens per image", vision["tokens_per_image"]]]


def _card_summary(manifest: dict, name: str) -> str:
    recipe, source, vision = manifest["recipe"], manifest["source"], manifest["components"]["vision"]
    model_name = recipe.get("model", {}).get("name", manifest["family"])
    verdict = "passed" if manifest["validation"]["passed"] else "FAILED"
    rows = [["base model", f"`{source['checkpoint']}`"], ["revision", source.get("revision") or "(not pinned)"],
            ["family", f"`{manifest['family']}`"], ["precision recipe", recipe.get("precision", {}).get("name", "-")],
            *_vision_rows(vision),
            ["validation", f"{verdict} ({len(manifest['validation']['checks'])} checks against PyTorch)"],
            ["built by", f"vlmforge {manifest['vlmforge_version']}"]]
    weights = "\n".join(f"- `{f}` sha256 `{h}`" for f, h in sorted(source.get("weights", {}).items()))
    return (f"# {name}\n\nONNX export of `{model_name}` ({manifest['family']}), built and validated by vlmforge.\n\n"
            + _table(["", ""], rows) + ("\nSource weights:\n\n" + weights + "\n" if weights else ""))


def _card_components(manifest: dict) -> str:
    rows = [[stage, f"`{c['file']}`", c["precision"], len(c.get("inputs", [])), len(c.get("outputs", []))]
            for stage, c in sorted(manifest["components"].items())]
    return ("## Components\n\n" + _table(["component", "file", "precision", "inputs", "outputs"], rows)
            + "\nInput/output names, dtypes and shapes are in `manifest.json` (`components`).\n")


def _card_deviation(variant: dict) -> str:
    statement = variant.get("statement") or json.dumps(variant, sort_keys=True)
    return ("## Deviation from the source model\n\n"
            f"> **This artifact set is not equivalent to its source model** (DeepStack: {variant.get('deepstack', '-')}).\n>\n"
            f"> {statement}\n")


def _card_validation(validation: dict) -> str:
    rows = [[c["stage"], c["name"], c["metric"], c["value"], c["tolerance"], c["passed"]] for c in validation["checks"]]
    return ("## Validation\n\nEvery check compares the ONNX graphs with the PyTorch model they were exported from.\n\n"
            + _table(["stage", "check", "metric", "value", "tolerance", "pass"], rows))


def _card_usage(name: str, has_genai: bool) -> str:
    text = ("## How to run it\n\n```bash\n"
            f"vlmforge verify {name}\n"
            f"vlmforge generate {name} --image x.png --prompt \"Describe this image.\"\n```\n")
    if has_genai:
        text += ("\nWith onnxruntime-genai (`pip install onnxruntime-genai`):\n\n```python\n"
                 "import json\nimport onnxruntime_genai as og\n\n"
                 f"model = og.Model(\"{name}\")\n"
                 "processor = model.create_multimodal_processor()  # og.MultiModalProcessor\n"
                 "tokenizer = og.Tokenizer(model)\n"
                 "messages = [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", \"text\": \"Describe this image.\"}]}]\n"
                 "prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)\n"
                 "inputs = processor(prompt, images=og.Images.open(\"x.png\"))\n"
                 "params = og.GeneratorParams(model)\nparams.set_search_options(max_length=1024)\n"
                 "generator = og.Generator(model, params)\ngenerator.set_inputs(inputs)\n"
                 "stream = processor.create_stream()\n"
                 "while not generator.is_done():\n"
                 "    generator.generate_next_token()\n"
                 "    print(stream.decode(generator.get_next_tokens()[0]), end=\"\", flush=True)\n```\n")
    return text


def _card_toolchain(manifest: dict) -> str:
    tc = manifest["toolchain"]
    rows = [["python", tc.get("python", "-")]] + [[k, v] for k, v in sorted(tc.get("packages", {}).items())]
    return "## Toolchain\n\n" + _table(["package", "version"], rows)


def _card_files() -> str:
    return ("## Files and integrity\n\n"
            f"`{SUMS}` lists the sha256 of every file but itself: run `sha256sum -c {SUMS}` inside this folder, "
            "or `vlmforge verify` on the folder or its `.tar.gz`, which also checks `manifest.json`.\n")
