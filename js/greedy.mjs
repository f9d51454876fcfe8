// Greedy generation with transformers.js on a layout written by `vlmforge export-js`, from local files only.
//
//   node js/greedy.mjs OUT --image cat.png --prompt "Describe this image." --tokens 12
//   node js/greedy.mjs OUT --image a.png --image b.jpg --prompt "Compare them." --pixels pv.bin
//
// Prints one JSON object on stdout: {"prompt_tokens": [...], "new_tokens": [...], "text": "...", timings}.
// The prompt goes through the layout's chat template (one image part per --image before the text), the images
// through the layout's own processor (preprocessor_config.json), exactly as a transformers.js app would.
// --pixels FILE also writes the pixel_values the vision encoder got (float32, little-endian, row-major
// [num_patches, C*T*P*P]; the grid is image_grid_thw in the JSON).
// Exit code 2 with one line on stderr for a usage or input mistake; anything else is a failure of the client.

import path from 'node:path';
import fs from 'node:fs';
import { parseArgs } from 'node:util';

function fail(message) {
    process.stderr.write(`greedy.mjs: ${message}\n`);
    process.exit(2);
}

function options() {
    let parsed;
    try {
        parsed = parseArgs({
            allowPositionals: true,
            options: {
                image: { type: 'string', multiple: true, default: [] },
                prompt: { type: 'string' },
                tokens: { type: 'string', default: '16' },
                'min-tokens': { type: 'string' },
                pixels: { type: 'string' },
            },
        });
    } catch (err) {
        fail(err.message);
    }
    const { values, positionals } = parsed;
    if (positionals.length !== 1) fail('usage: greedy.mjs OUT --prompt TEXT [--image FILE]... [--tokens N]');
    if (values.prompt === undefined) fail('--prompt is required');
    const tokens = Number.parseInt(values.tokens, 10);
    const minTokens = values['min-tokens'] === undefined ? 0 : Number.parseInt(values['min-tokens'], 10);
    if (!(tokens > 0) || !(minTokens >= 0)) fail('--tokens must be a positive integer, --min-tokens >= 0');
    const dir = path.resolve(positionals[0]);
    if (!fs.existsSync(path.join(dir, 'config.json'))) fail(`${dir} has no config.json: not an export-js layout`);
    for (const img of values.image) if (!fs.existsSync(img)) fail(`image ${img} does not exist`);
    return { dir, images: values.image, prompt: values.prompt, tokens, minTokens, pixels: values.pixels };
}

// A fixed-shape vision graph takes one grid: say so, instead of onnxruntime's "invalid dimensions".
function checkGrid(opts, inputs, patch) {
    const mark = path.join(opts.dir, 'export_js.json');
    const fixed = fs.existsSync(mark) ? JSON.parse(fs.readFileSync(mark, 'utf8')).vision?.fixed_hw : null;
    if (!fixed || !inputs.image_grid_thw) return;
    const want = [1, fixed[0] / patch, fixed[1] / patch];
    for (const [i, grid] of inputs.image_grid_thw.tolist().entries()) {
        const got = grid.map(Number);
        if (got.some((v, k) => v !== want[k])) {
            fail(`image ${opts.images[i]} is resized to ${got[1] * patch}x${got[2] * patch} (height x width); this layout's vision ` +
                 `graph takes ${fixed[0]}x${fixed[1]} (height x width) only: give an image of that aspect ratio ` +
                 `(that exact size is preprocessed as HF does), or export a dynamic-resolution set`);
        }
    }
}

// The processor's inputs for `text` and `images`. Several images are preprocessed one by one and joined row-wise
// (pixel_values) and per image (image_grid_thw), as HF does: transformers.js 4.3's Qwen2-VL image processor given
// a list stacks the images into one temporal patch pair (image_processing_qwen2_vl.js), one image of two frames.
// The processor then expands each <|image_pad|> by its own image's grid, so it is called with the joined result.
async function prepare(processor, text, images, cat) {
    if (images.length <= 1) return images.length ? await processor(text, images[0]) : await processor(text);
    const parts = [];
    for (const image of images) parts.push(await processor.image_processor(image));
    const joined = {
        pixel_values: cat(parts.map((p) => p.pixel_values), 0),
        image_grid_thw: cat(parts.map((p) => p.image_grid_thw), 0),
    };
    const imageProcessor = processor.components.image_processor;
    // Qwen2VLProcessor._call then expands the prompt from the joined grids (and reads the merge size from config)
    processor.components.image_processor = Object.assign(async () => joined, { config: imageProcessor.config });
    try {
        return await processor(text, images);
    } finally {
        processor.components.image_processor = imageProcessor;
    }
}

// transformers.js 4.3.2's text-only MRoPE delta (Qwen2VLForConditionalGeneration._get_text_only_rope_index) is
// max(position) + 1 + length where HF's is max(position) + 1 - length (0 for a plain prompt), so every token after
// the first of a prompt without images is generated at positions 2 * length too far and differs from HF's.
// Probed on a 3-token mask; corrected only while the library gives a nonzero delta there.
function fixTextOnlyRopeDelta(model, Tensor) {
    const original = model._get_text_only_rope_index?.bind(model);
    if (!original) return false;
    const probe = new Tensor('int64', new BigInt64Array([1n, 1n, 1n]), [1, 3]);
    const bias = original(probe, probe)[1].data[0]; // HF: 0
    if (bias === 0n) return false;
    model._get_text_only_rope_index = (inputIds, mask) => {
        const [positions, deltas] = original(inputIds, mask);
        if (!mask) return [positions, deltas];
        const excess = 2n * BigInt(mask.dims[1]);
        return [positions, new Tensor('int64', deltas.data.map((d) => d - excess), deltas.dims)];
    };
    return true;
}

async function main() {
    const opts = options();
    const { AutoProcessor, AutoModelForImageTextToText, RawImage, Tensor, cat, env } = await import('@huggingface/transformers');
    env.allowRemoteModels = false; // local files only: never a hub request
    env.allowLocalModels = true;
    env.localModelPath = path.dirname(opts.dir);
    const id = path.basename(opts.dir);

    const t0 = performance.now();
    const processor = await AutoProcessor.from_pretrained(id);
    const model = await AutoModelForImageTextToText.from_pretrained(id);
    const ropeFixed = fixTextOnlyRopeDelta(model, Tensor);
    const t1 = performance.now();

    const content = [...opts.images.map(() => ({ type: 'image' })), { type: 'text', text: opts.prompt }];
    const text = processor.apply_chat_template([{ role: 'user', content }], { add_generation_prompt: true });
    const images = await Promise.all(opts.images.map((p) => RawImage.read(p)));
    const inputs = await prepare(processor, text, images, cat);
    checkGrid(opts, inputs, processor.image_processor?.config?.patch_size);
    if (opts.pixels && inputs.pixel_values) {
        const data = inputs.pixel_values.data;
        fs.writeFileSync(opts.pixels, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
    }
    const out = await model.generate({
        ...inputs,
        max_new_tokens: opts.tokens,
        min_new_tokens: opts.minTokens || null,
        do_sample: false,
    });
    const t2 = performance.now();

    const promptLength = inputs.input_ids.dims[1];
    const all = out.tolist()[0].map(Number);
    const newTokens = all.slice(promptLength);
    const result = {
        prompt_tokens: all.slice(0, promptLength),
        new_tokens: newTokens,
        text: processor.tokenizer.decode(newTokens, { skip_special_tokens: true }),
        image_grid_thw: inputs.image_grid_thw ? inputs.image_grid_thw.tolist().map((r) => r.map(Number)) : [],
        text_only_rope_delta_fixed: ropeFixed,
        load_ms: Math.round(t1 - t0),
        generate_ms: Math.round(t2 - t1),
    };
    process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((err) => {
    process.stderr.write(`greedy.mjs: transformers.js failed: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
});
