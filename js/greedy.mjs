// Greedy generation with transformers.js on a layout written by `vlmforge export-js`, from local files only.
//
//   node js/greedy.mjs OUT --image cat.png --prompt "Describe this image." --tokens 12
//
// Prints one JSON object on stdout: {"prompt_tokens": [...], "new_tokens": [...], "text": "...", timings}.
// The prompt goes through the layout's chat template (one image part before the text when --image is given),
// the image through the layout's own processor (preprocessor_config.json), exactly as a transformers.js app would.
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
    // transformers.js 4.3's Qwen2-VL image processor stacks several images into one temporal patch pair
    // (image_processing_qwen2_vl.js) and then fails expanding the prompt: one image per prompt.
    if (values.image.length > 1) fail('one --image per prompt: transformers.js 4.3 does not preprocess several images for this model class');
    return { dir, images: values.image, prompt: values.prompt, tokens, minTokens };
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

async function main() {
    const opts = options();
    const { AutoProcessor, AutoModelForImageTextToText, RawImage, env } = await import('@huggingface/transformers');
    env.allowRemoteModels = false; // local files only: never a hub request
    env.allowLocalModels = true;
    env.localModelPath = path.dirname(opts.dir);
    const id = path.basename(opts.dir);

    const t0 = performance.now();
    const processor = await AutoProcessor.from_pretrained(id);
    const model = await AutoModelForImageTextToText.from_pretrained(id);
    const t1 = performance.now();

    const content = [...opts.images.map(() => ({ type: 'image' })), { type: 'text', text: opts.prompt }];
    const text = processor.apply_chat_template([{ role: 'user', content }], { add_generation_prompt: true });
    const images = await Promise.all(opts.images.map((p) => RawImage.read(p)));
    const inputs = images.length ? await processor(text, images.length === 1 ? images[0] : images) : await processor(text);
    checkGrid(opts, inputs, processor.image_processor?.config?.patch_size);
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
        load_ms: Math.round(t1 - t0),
        generate_ms: Math.round(t2 - t1),
    };
    process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((err) => {
    process.stderr.write(`greedy.mjs: transformers.js failed: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
});
