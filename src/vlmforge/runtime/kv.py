"""The decoder's KV cache, run through onnxruntime IOBinding: the cache is allocated once per
generation and never reallocated or copied on the host between steps.

The exported decoder concatenates ``past_key_values.{i}`` with the new keys/values inside the graph and
returns ``present.{i}`` of length past + new, so a present is necessarily a new tensor each step (the
in-graph Concat reads the whole past once per step; only a fused, shared-buffer attention kernel
would avoid that). What the host controls is where presents land and how they come back in. Modes:

* ``preallocated`` (default): two flat buffers ("ping" and "pong"), each holding every layer's key and
  value at the capacity the generation needs (prompt + max_new_tokens), allocated once. Step n reads its
  past from one buffer and ORT writes the presents straight into the other (each output bound to the
  start of its layer's segment as ``[B, H_kv, past + new, D]``, which is contiguous); the next step
  binds those same OrtValues as its past and swaps the buffers. Logits go into one reused host buffer.
  On CPU the buffers are numpy arrays bound as OrtValue views (``bind_ortvalue_*`` costs ~0.3 us a call;
  the pointer form ``bind_input`` ~9 us, which at 2 x layers calls per step was measurable); on a
  device EP they are device OrtValues bound by pointer, so the cache never crosses to the host.
* ``ortvalue``: outputs bound to ORT-allocated OrtValues fed back as the next step's past (no host copy;
  the arena hands out new blocks each step).
* ``numpy``: `session.run` with numpy in and out, what the validators' `Engine.decode` does; kept as the
  "before" baseline of the benchmark.

Decode steps (`decode`, tokens in) also bind the embedding graph once: token ids from a reused
``[B, 1]`` buffer, its ``inputs_embeds`` (and ``deepstack_embeds``) written straight into the buffers
the decoder has bound, so a step is two ``run_with_iobinding`` calls with only the attention mask and
the cache rebound. Together with `HostBinding` this took the tiny fixture's step (1 thread) from 0.19
to 0.15 ms, against 0.13 ms for onnxruntime-genai's C++ loop on the same graphs.

All three give bit-identical logits (same graph, same inputs). Measured on CPU (2 cores, onnxruntime
1.31): the modes are within noise of each other, because onnxruntime's Python binding already returns
CPU outputs as numpy views of its own buffers (no copy) and its arena reuses the freed blocks; the
decode step is bound by reading the weights. The binding pays off where `session.run` must copy the
cache device -> host -> device every step (CUDA and other device EPs).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from vlmforge.core.errors import InputError
from vlmforge.runtime.engine import embedding_feeds
from vlmforge.runtime.hostbind import HostBinding

MODES = ("preallocated", "ortvalue", "numpy")


def device_of(providers: list[str] | None) -> str:
    """The OrtValue device name for a provider list (where KV buffers live)."""
    first = (providers or ["CPUExecutionProvider"])[0]
    first = first[0] if isinstance(first, (tuple, list)) else first
    return {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}.get(first, "cpu")


class BoundDecoder:
    """One generation's decoder state: KV cache, past length, bound I/O.

    `run(...)` takes one chunk (prefill) or one token per row (decode) and returns the logits
    ``[B, S, V]`` as a numpy array that is only valid until the next `run` (it is a reused buffer).
    """

    def __init__(self, graph, layout, *, batch: int, capacity: int, mode: str = "preallocated", device: str = "cpu",
                 embedding=None):
        """`embedding`: the embedding graph; with it, `decode` runs whole decode steps (tokens in, logits
        out) and, in the bound CPU modes, writes the embeddings straight into this decoder's bound input."""
        if mode not in MODES:
            raise InputError(f"unknown KV cache mode {mode!r}", where="vlmforge.runtime.kv.BoundDecoder",
                             fix=f"use one of {', '.join(MODES)}")
        self.graph = graph
        self.session: ort.InferenceSession = graph.session
        self.layout = layout
        self.batch = int(batch)
        self.capacity = int(capacity)
        self.mode = mode
        self.device = device
        self.past_len = 0
        self.kv_dtype = np.dtype(graph.input_types["past_key_values.0.key"])
        logits_out = {o.name: o for o in self.session.get_outputs()}["logits"]
        self.logits_dtype = np.dtype(np.float16 if logits_out.type == "tensor(float16)" else np.float32)
        self.vocab = logits_out.shape[-1]
        if not isinstance(self.vocab, int):
            raise InputError(f"decoder logits have a symbolic vocabulary dimension {self.vocab!r}",
                             where=str(graph.path), fix="export the decoder with a static vocabulary size")
        L, H, D = layout.num_layers, layout.kv_heads, layout.head_dim
        self._names = [(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}") for i in range(L) for kv in ("key", "value")]
        self._segment = self.batch * H * self.capacity * D  # elements per layer key (or value)
        self._host = HostBinding(self.session) if mode != "numpy" else None
        self._io = self._host.io if self._host is not None else None
        self._logits = np.empty((0, 0, 0), self.logits_dtype)
        self._small: dict[str, np.ndarray] = {}  # bound non-cache inputs, refilled in place when shapes repeat
        self._views: dict[str, np.ndarray] = {}  # callers' arrays bound as they are (kept alive while bound)
        self.embedding = embedding
        self._embed_host: HostBinding | None = None
        self._token_ids: np.ndarray | None = None
        if mode == "preallocated":
            size = 2 * L * self._segment
            if device == "cpu":  # numpy-owned buffers: views of them become OrtValues cheaply (no copy)
                self._buffers = [np.empty(size, self.kv_dtype) for _ in range(2)]
                seg = self._segment  # each buffer's per-layer key/value segments, sliced once
                self._parts = [[buf[j * seg:(j + 1) * seg] for j in range(2 * L)] for buf in self._buffers]
            else:
                self._buffers = [ort.OrtValue.ortvalue_from_shape_and_type([size], self.kv_dtype, device, 0) for _ in range(2)]
            self._side = 0  # buffer holding the current past
            self._past_views: list | None = None  # OrtValues (of `HostBinding.value`) over the current past
        elif mode == "ortvalue":
            self._past_values: list[ort.OrtValue] | None = None
        else:
            empty = np.zeros((self.batch, H, 0, D), self.kv_dtype)
            self._past_arrays = [empty] * (2 * L)

    # -- public -------------------------------------------------------------------------------------
    def run(self, inputs_embeds, attention_mask, position_ids, deepstack_embeds=None) -> np.ndarray:
        b, s = inputs_embeds.shape[:2]
        total = self._check_fits(b, s, attention_mask)
        feeds = self._small_feeds(inputs_embeds, attention_mask, position_ids, deepstack_embeds)
        if self.mode == "numpy":
            logits = self._run_numpy(feeds)
        else:
            for name, arr in feeds.items():
                self._bind_small(name, arr)
            logits = self._run_bound(b, s, total)
        self.past_len = total
        return logits

    def decode(self, tokens, attention_mask, position_ids) -> np.ndarray:
        """One decode step: `tokens` [B] (one per row) through the embedding graph and the decoder;
        returns the logits [B, 1, V] (a reused buffer, valid until the next call)."""
        if self.embedding is None:
            raise InputError("this BoundDecoder has no embedding graph", where="vlmforge.runtime.kv.BoundDecoder.decode",
                             fix="pass embedding=engine.embedding when creating it, or call run() with inputs_embeds")
        tokens = np.asarray(tokens, np.int64).reshape(-1, 1)
        if not self._embed_bound():
            out = self.embedding.run(embedding_feeds(self.layout, tokens))
            positions = np.broadcast_to(position_ids, (3, tokens.shape[0], 1))
            return self.run(out["inputs_embeds"], attention_mask, positions, out.get("deepstack_embeds"))
        b = tokens.shape[0]
        total = self._check_fits(b, 1, attention_mask)
        for name, held in self._embed_targets.items():
            if self._small.get(name) is not held:  # a run() of another shape rebound the decoder input
                self._host.bind_input(name, self._host.value(held))
                self._small[name] = held
        self._token_ids[...] = tokens
        self._embed_host.run()
        self._bind_view("attention_mask", attention_mask)
        positions = self._small.get("position_ids")
        if positions is not None and positions.shape == (3, b, 1):
            positions[...] = position_ids  # [3 or 1, B, 1], broadcast over the MRoPE axes
        else:
            self._bind_small("position_ids", np.broadcast_to(position_ids, (3, b, 1)))
        logits = self._run_bound(b, 1, total)
        self.past_len = total
        return logits

    def load_past(self, arrays: list[np.ndarray]) -> None:
        """Start from a given cache (``2 * layers`` arrays ``[B, H_kv, past, D]``): benchmarks at a long
        context without paying for its prefill, and tests."""
        L, H, D = self.layout.num_layers, self.layout.kv_heads, self.layout.head_dim
        past = arrays[0].shape[2]
        if len(arrays) != 2 * L or any(a.shape != (self.batch, H, past, D) for a in arrays) or past > self.capacity:
            raise InputError(f"load_past needs {2 * L} arrays of shape [{self.batch}, {H}, past <= {self.capacity}, {D}]",
                             where="vlmforge.runtime.kv.BoundDecoder.load_past", fix="pass a cache of this decoder's layout")
        arrays = [np.ascontiguousarray(a, dtype=self.kv_dtype) for a in arrays]
        if self.mode == "numpy":
            self._past_arrays = arrays
        elif self.mode == "ortvalue":
            self._past_values = [ort.OrtValue.ortvalue_from_numpy(a, self.device) for a in arrays]
        else:
            n = self.batch * H * past * D
            for j, a in enumerate(arrays):
                seg = slice(j * self._segment, j * self._segment + n)
                if isinstance(self._buffers[self._side], np.ndarray):
                    self._buffers[self._side][seg] = a.reshape(-1)
                else:
                    raise InputError("load_past on a device cache is not supported", where="BoundDecoder.load_past",
                                     fix="use a CPU provider")
            if self.device == "cpu":
                buf = self._buffers[self._side]
                self._past_views = [self._host.value(
                    buf[j * self._segment: j * self._segment + n].reshape(self.batch, H, past, D)) for j in range(2 * L)]
        self.past_len = past

    def past(self) -> list[np.ndarray]:
        """The cache as numpy arrays ``[B, H_kv, past, D]`` (copies; for tests and debugging)."""
        L, H, D = self.layout.num_layers, self.layout.kv_heads, self.layout.head_dim
        n = self.batch * H * self.past_len * D
        if self.mode == "numpy":
            return [a.copy() for a in self._past_arrays]
        if self.mode == "ortvalue":
            if self._past_values is None:
                return [np.zeros((self.batch, H, 0, D), self.kv_dtype) for _ in range(2 * L)]
            return [v.numpy() for v in self._past_values]
        flat = self._buffers[self._side]
        flat = flat if isinstance(flat, np.ndarray) else flat.numpy()
        return [flat[j * self._segment: j * self._segment + n].reshape(self.batch, H, self.past_len, D).copy()
                for j in range(2 * L)]

    # -- internals ----------------------------------------------------------------------------------
    def _check_fits(self, b: int, s: int, attention_mask) -> int:
        """The past length after a step of `s` new tokens per row; refuses a step the cache cannot hold."""
        total = self.past_len + s
        if b != self.batch or total > self.capacity or attention_mask.shape != (b, total):
            raise InputError(
                f"decoder step of shape batch {b} x {s} new tokens with past {self.past_len} does not fit the KV "
                f"cache (batch {self.batch}, capacity {self.capacity}) or the attention mask {attention_mask.shape}",
                where="vlmforge.runtime.kv.BoundDecoder",
                fix="create the BoundDecoder with capacity >= prompt length + max_new_tokens",
            )
        return total

    def _small_feeds(self, inputs_embeds, attention_mask, position_ids, deepstack_embeds) -> dict[str, np.ndarray]:
        types = self.graph.input_types
        feeds = {
            "inputs_embeds": np.ascontiguousarray(inputs_embeds, dtype=types["inputs_embeds"]),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=types["attention_mask"]),
            "position_ids": np.ascontiguousarray(position_ids, dtype=types["position_ids"]),
        }
        if self.layout.deepstack_layers:
            if deepstack_embeds is None:
                b, s = inputs_embeds.shape[:2]
                deepstack_embeds = np.zeros((self.layout.deepstack_layers, b, s, self.layout.hidden), np.float32)
            feeds["deepstack_embeds"] = np.ascontiguousarray(deepstack_embeds, dtype=types["deepstack_embeds"])
        return feeds

    def _embed_bound(self) -> bool:
        """Bind the embedding graph for decode steps (once): token ids from a reused [B, 1] buffer, its
        outputs written into this decoder's bound input buffers. False where that does not apply (the
        numpy mode, a device EP, or embedding outputs whose type differs from the decoder's inputs)."""
        if self._embed_host is not None:
            return True
        if self.mode == "numpy" or self.device != "cpu":
            return False
        emb, dec_types = self.embedding, self.graph.input_types
        outputs = {o.name: o.type for o in emb.session.get_outputs()}
        dec_inputs = {i.name: i.type for i in self.session.get_inputs()}
        wanted = [n for n in outputs if n in dec_inputs]
        if "inputs_embeds" not in wanted or any(outputs[n] != dec_inputs[n] for n in wanted):
            return False
        host = HostBinding(emb.session)
        b, H, L = self.batch, self.layout.hidden, self.layout.deepstack_layers
        self._token_ids = np.zeros((b, 1), emb.input_types["input_ids"])
        self._embed_inputs = {k: np.ascontiguousarray(v, dtype=emb.input_types[k])
                              for k, v in embedding_feeds(self.layout, self._token_ids).items() if k != "input_ids"}
        host.bind_input("input_ids", host.value(self._token_ids))
        for name, arr in self._embed_inputs.items():
            host.bind_input(name, host.value(arr))
        shapes = {"inputs_embeds": (b, 1, H), "deepstack_embeds": (L, b, 1, H)}
        self._embed_targets = {}
        for name in outputs:
            if name in wanted:  # the decoder reads this buffer: bind it on both sides, once
                held = np.zeros(shapes[name], dec_types[name])
                self._host.bind_input(name, self._host.value(held))
                self._small[name] = held
                self._embed_targets[name] = held
                host.bind_output(name, host.value(held))
            else:
                host.io.bind_output(name, "cpu")
        self._embed_host = host
        return True

    def _bind_view(self, name: str, arr: np.ndarray) -> None:
        """Bind the caller's array itself when it is contiguous and of the input's type (held here until
        the next step; never written); a copy otherwise."""
        if arr.flags.c_contiguous and arr.dtype == self.graph.input_types[name]:
            self._small.pop(name, None)
            self._views[name] = arr
            self._host.bind_input(name, self._host.value(arr))
        else:
            self._views.pop(name, None)
            self._bind_small(name, np.ascontiguousarray(arr, dtype=self.graph.input_types[name]))

    def _bind_small(self, name: str, arr: np.ndarray) -> None:
        """Bind a non-cache input. A bound buffer of the same shape is refilled in place (a copy of a few
        hundred bytes) instead of binding a new OrtValue: at decode steps inputs_embeds, position_ids
        and deepstack_embeds keep their shape, so only the attention mask is rebound."""
        held = self._small.get(name)
        if held is not None and held.shape == arr.shape:
            np.copyto(held, arr)
            return
        self._views.pop(name, None)
        held = np.array(arr, copy=True, order="C")
        self._host.bind_input(name, self._host.value(held))
        self._small[name] = held

    def _run_numpy(self, feeds) -> np.ndarray:
        for (past_name, _), arr in zip(self._names, self._past_arrays):
            feeds[past_name] = arr
        names = ["logits"] + [present for _, present in self._names]
        out = self.session.run(names, feeds)
        self._past_arrays = out[1:]
        return out[0]

    def _run_bound(self, b: int, s: int, total: int) -> np.ndarray:
        # Bindings are replaced name by name every step (no clear): the set of names never changes.
        # On CPU everything is bound as OrtValues over numpy memory through `HostBinding` (~0.5 us a
        # call; the public wrappers cost 1.5-2 us and the pointer form bind_input ~9 us, which at
        # 4 x layers calls per step showed up on small models).
        io, host = self._io, self._host
        H, D = self.layout.kv_heads, self.layout.head_dim
        if self.mode == "preallocated":
            dst = self._buffers[1 - self._side]
            if self.device == "cpu":
                n = b * H * total * D
                shape, value = (b, H, total, D), host.value
                outs = [value(part[:n].reshape(shape)) for part in self._parts[1 - self._side]]
                if self._past_views is None:
                    self._empty_past = np.zeros((b, H, 0, D), self.kv_dtype)
                    self._past_views = [value(self._empty_past)] * len(self._names)
                bind_in, bind_out = host.bind_input, host.bind_output
                for (past_name, present_name), past, out in zip(self._names, self._past_views, outs):
                    bind_in(past_name, past)
                    bind_out(present_name, out)
                self._past_views = outs  # this step's presents are the next step's past, same memory
            else:
                src = self._buffers[self._side]
                step = self._segment * self.kv_dtype.itemsize
                for j, (past_name, present_name) in enumerate(self._names):
                    io.bind_input(past_name, self.device, 0, self.kv_dtype, [b, H, self.past_len, D], src.data_ptr() + j * step)
                    io.bind_output(present_name, self.device, 0, self.kv_dtype, [b, H, total, D], dst.data_ptr() + j * step)
        else:
            for j, (past_name, present_name) in enumerate(self._names):
                if self._past_values is None:
                    io.bind_cpu_input(past_name, np.zeros((b, H, 0, D), self.kv_dtype))
                else:
                    io.bind_ortvalue_input(past_name, self._past_values[j])
                io.bind_output(present_name, self.device)
        if self._logits.shape != (b, s, self.vocab):
            # one buffer per shape: decode steps keep the same [B, 1, V] buffer bound (no rebinding)
            self._logits = np.empty((b, s, self.vocab), self.logits_dtype)
            host.bind_output("logits", host.value(self._logits))
        logits = self._logits
        host.run()
        if self.mode == "preallocated":
            self._side = 1 - self._side
        else:
            self._past_values = io.get_outputs()[:-1]  # bind order: the presents, then logits
        return logits
