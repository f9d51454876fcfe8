"""onnxruntime sessions for one artifact set, with numpy in and out.

This is the engine the validators use on a build's staging directory (before any manifest exists)
and the base of the user-facing runtime. Float inputs are cast to whatever each graph declares, so
FP16 graphs with FP16 I/O run through the same calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlmforge.core.contracts import KVLayout, TensorSpec, diff_contract

_ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(uint8)": "uint8"}


def session_io(session: ort.InferenceSession) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A session's graph inputs and outputs as TensorSpecs (symbolic dims by name), to diff with a contract."""
    def spec(arg) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) else str(d) for d in (arg.shape or ()))
        return TensorSpec(arg.name, _ORT_DTYPES.get(arg.type, arg.type), dims)

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]


def contract_problems(graph: "Graph", component: dict) -> list[str]:
    """How a loaded graph differs from the manifest's component contract (names, dtypes, every dim)."""
    declared = lambda key: tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in component[key])  # noqa: E731
    inputs, outputs = session_io(graph.session)
    return diff_contract(inputs, declared("inputs"), "input") + diff_contract(outputs, declared("outputs"), "output")


def precision_problems(path: Path, precision: str) -> list[str]:
    """Does the graph hold the weights its precision label says? (An FP16 graph under an `fp32` label runs
    without any error and answers differently.) Reads the graph without its external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fp16 = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    nbits = sum(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in model.graph.node)
    if precision == "fp32" and (fp16 or nbits):
        return [f"labelled fp32 but holds {fp16} float16 initializers and {nbits} 4-bit quantized nodes"]
    if precision == "fp16" and (not fp16 or nbits):
        return [f"labelled fp16 but holds {fp16} float16 initializers and {nbits} 4-bit quantized nodes"]
    return []  # int4 stages may legitimately keep every weight float (nothing quantizable): not judged here


def make_session(path: Path, providers: list[str] | None = None, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...): one answer
        from vlmforge.core.errors import ArtifactError

        raise ArtifactError(f"onnxruntime cannot load {Path(path).name}: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}", where=str(path),
                            fix="rebuild the artifact set, or fetch the release again") from None


class Graph:
    def __init__(self, path: Path, providers: list[str] | None = None, threads: int = 0) -> None:
        self.path = Path(path)
        self.session = make_session(self.path, providers, threads)
        self.input_types = {i.name: _ORT_TO_NP.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        cast = {k: np.ascontiguousarray(v, dtype=self.input_types[k]) for k, v in feeds.items() if k in self.input_types}
        names = outputs or self.output_names
        values = self.session.run(names, cast)
        return {n: (v.astype(np.float32) if v.dtype == np.float16 else v) for n, v in zip(names, values)}


class Engine:
    """vision -> embedding -> decoder for one artifact set."""

    # (pixel_values shape, image_grid_thw) -> None or an InputError: set for dynamic vision graphs
    # (host.dynamic.check_grid), so a pair the graph cannot take fails before onnxruntime runs
    vision_check = None

    def __init__(self, vision: Path, embedding: Path, decoder: Path, layout: KVLayout, providers=None,
                 threads: int = 0) -> None:
        """`threads`: onnxruntime intra-op threads per session (0 = onnxruntime's default, all cores)."""
        self.vision = Graph(vision, providers, threads)
        self.embedding = Graph(embedding, providers, threads)
        self.decoder = Graph(decoder, providers, threads)
        self.layout = layout

    def encode_image(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.vision_check is not None:
            self.vision_check(np.shape(pixel_values), grid_thw)
        out = self.vision.run({"pixel_values": pixel_values, "image_grid_thw": grid_thw})
        return out["image_features"], out.get("deepstack_features")

    def embed(self, input_ids: np.ndarray, features: np.ndarray | None, deepstack: np.ndarray | None):
        out = self.embedding.run(embedding_feeds(self.layout, input_ids, features, deepstack))
        return out["inputs_embeds"], out.get("deepstack_embeds")

    def empty_past(self, batch: int) -> list[np.ndarray]:
        lay = self.layout
        return [np.zeros((batch, lay.kv_heads, 0, lay.head_dim), np.float32) for _ in range(2 * lay.num_layers)]

    def decode(self, inputs_embeds, attention_mask, position_ids, past: list[np.ndarray], deepstack_embeds=None):
        feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.layout.deepstack_layers:
            if deepstack_embeds is None:
                b, s = inputs_embeds.shape[:2]
                deepstack_embeds = np.zeros((self.layout.deepstack_layers, b, s, self.layout.hidden), np.float32)
            feeds["deepstack_embeds"] = deepstack_embeds
        for i in range(self.layout.num_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = self.decoder.run(feeds)
        presents = []
        for i in range(self.layout.num_layers):
            presents += [out[f"present.{i}.key"], out[f"present.{i}.value"]]
        return out["logits"], presents


def embedding_feeds(layout: KVLayout, input_ids: np.ndarray, features: np.ndarray | None = None,
                    deepstack: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The embedding graph's inputs; no features (decode steps, text only) -> empty image features."""
    L, H = layout.deepstack_layers, layout.hidden
    feeds = {
        "input_ids": np.asarray(input_ids).astype(np.int64),
        "image_features": features if features is not None else _empty((0, H)),
    }
    if L:
        feeds["deepstack_features"] = deepstack if deepstack is not None else _empty((L, 0, H))
    return feeds


_EMPTY: dict[tuple[int, ...], np.ndarray] = {}


def _empty(shape: tuple[int, ...]) -> np.ndarray:
    """A shared zero-size float32 array (decode steps feed no image features)."""
    if shape not in _EMPTY:
        _EMPTY[shape] = np.zeros(shape, np.float32)
    return _EMPTY[shape]
