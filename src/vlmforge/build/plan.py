"""The plan of one build: its nodes, each with the inputs its cache key is made of, the nodes it depends on,
the code it runs, and the function that does its work (vlmforge.build.nodes). One executor runs them all
(vlmforge.build.execute); nothing here writes a file or loads a model.

    export.<stage>               the FP32 graph of a stage (into the set, or only behind a transform)
    transform.<stage>.<p>        that graph after transform <p> (transforms.TRANSFORMS[p]); for a FUSED_STAGES stage
                                 whose transform can run inside the export, the export and the transform in one
                                 node (no export.<stage>: its FP32 graph is never written)
    runtime_configs              tokenizer/processor files, genai_config.json, runtime_config.json (every build)
    validation                   the checks of the whole set against PyTorch (cached only when they pass)
    manifest                     the description of the set, validated before it is published (every build)

A node's key is a sha256 over its declared inputs, the keys of its dependencies and the digest of the code
it runs (vlmforge.codekey), so a key changes exactly when something the node reads changes:

* an export: the source (sha256 of every weight file and of config.json), family and stage, the options the
  stage reads (image size for vision only; the DeepStack choice), model.load_dtype / trust_remote_code,
  target.export_device, the toolchain (python and every package version `manifest.toolchain()` records);
* a transform: its precision, its row of the table and the recipe values that row declares, plus its export
  (a fused one: the export's inputs and code in place of the export's key);
* runtime configs: the checkpoint's runtime files and the options, plus the stage nodes;
* validation: validate.*, the images, target.providers, precisions, DeepStack choice, plus every stage node,
  every FP32 export and the runtime configs.

Not in a stage key: validate.*, out_dir, name, target.providers (they cannot change a graph).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlmforge import codekey
from vlmforge.artifact.manifest import toolchain
from vlmforge.build import nodes as N
from vlmforge.build.cache import digest
from vlmforge.build.nodes import RUNTIME_FILES, STAGE_READS, StageOptions
from vlmforge.build.publish_dir import work_dirs
from vlmforge.config import BuildConfig
from vlmforge.core.errors import CheckpointError, RecipeError
from vlmforge.core.hashing import sha256_file
from vlmforge.loading import REFERENCES, reference_kind, reference_model
from vlmforge.progress import Progress
from vlmforge.registry import STAGES, family_module
from vlmforge.source import checkpoint_file, parameter_counts
from vlmforge.transforms import TRANSFORMS

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Node:
    name: str
    run: Callable  # run(build, node, folder) -> record (JSON); folder: the cache's temp folder, or staging
    inputs: dict  # what the key is made of, besides the dependencies' keys and the code
    deps: tuple[str, ...] = ()  # nodes whose keys enter this key
    code: str = ""  # digest of the source the node runs (codekey)
    slot: str | None = None  # cache slot under <cache_dir>/stages/<family>/; None: not cached, runs every build
    output: str = "set"  # set: its files go into the artifact set | scratch: only for nodes that read them | none
    scratch: tuple[str, ...] = ()  # deps whose files it reads from the scratch folder (put there if it runs)
    stage: str | None = None
    label: str = ""  # how log lines name it
    done: str = ""  # log line after it ran: {seconds}, {short}, {checks}
    hit: str = "up to date (cache {short})"  # log line on a cache hit
    timing: str = ""  # its key in BuildReport.seconds
    keep: Callable[[dict], bool] | None = None  # cache the record only if keep(record) (passing validations)


@dataclass
class Build:
    """One build's facts, read by the nodes: the recipe, the checkpoint, the contracts, the working folders,
    and the PyTorch model, loaded the first time a node that runs asks for it."""

    cfg: BuildConfig
    family: object  # FamilySpec
    source: object  # source.Source
    final: Path
    progress: Progress
    hf_config: object
    options: StageOptions
    parameters: int
    stage_parameters: dict  # stage -> parameters its graph holds ({} when the family names no prefixes)
    precision: dict  # stage -> precision
    contracts: dict  # stage -> the FP32 export's contract
    final_contracts: dict  # stage -> the contract of the graph in the set (FP16 I/O where a transform says so)
    staging: Path
    scratch: Path
    timings: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)  # node name -> record, as the executor produces them
    params: object = None  # the image parameters (host.image.ImageParams), set by runtime_configs
    checks: tuple | None = None  # (checks, variant) of a validation that ran in this build
    staged: dict = field(default_factory=dict)  # staged file -> {sha256, bytes, stat}: hashed as it was copied
    _model: object = None
    model_loaded: bool = False  # the whole PyTorch model was loaded in this build (for validation)

    @property
    def deepstack(self) -> bool:
        return self.options.deepstack

    def model(self, why: str):
        if self._model is None:
            t = time.perf_counter()
            log.info("loading the PyTorch model from %s (for %s)", self.source.path, why)
            with self.progress.step("loading the PyTorch model"):
                self._model = reference_model(self.source, self.hf_config, self.cfg.model.load_dtype,
                                              self.reference)
            self.timings["load_model"] = time.perf_counter() - t
            self.model_loaded = True
        return self._model

    @property
    def reference(self) -> str:
        """How the validation's PyTorch reference holds its weights: resident or streamed (validate.reference)."""
        return reference_kind(self.cfg.validate.reference, self.parameters)

    def take_model(self):
        """The model, handed over: the build keeps no reference, so the validation frees it after its
        reference pass (a later export would load it again)."""
        model, self._model = self.model("validation"), None
        return model

    def bytes_needed(self) -> int:
        """Disk a build of this model needs: the set (each stage at its precision), and, when the stage cache
        shares the file system, the cache: every stage's FP32 export and the transformed graphs. Per stage from
        the parameters it reads (full-depth Qwen2.5-VL-3B int4_mixed, its decoder's FP32 graph still cached then:
        21.5 GiB measured, 22.1 GiB predicted)."""
        from vlmforge.launch.plan import stage_bytes

        counts = self.stage_parameters or {"decoder": self.parameters}
        at, fp32 = stage_bytes(counts, self.precision), stage_bytes(counts, {})
        set_bytes = sum(at.values()) + (16 << 20)
        # the FP32 exports the cache keeps (none of a stage exported straight to its precision), the transformed graphs
        cache = sum(n for s, n in fp32.items() if not fused(s, self.precision[s])) + sum(
            n for s, n in at.items() if self.precision[s] != "fp32")
        try:
            same = os.stat(Path(self.cfg.cache_dir)).st_dev == os.stat(self.final.parent).st_dev
        except OSError:
            same = True
        return int((set_bytes + (cache if same else 0)) * 1.05)


def open_build(cfg: BuildConfig, family, source, final: Path, image_size: int | None, progress: Progress) -> Build:
    """Read the checkpoint's config (no weights) and work out what the build makes. `image_size` None:
    vision=dynamic, whose pixel budget is the recipe's or else the checkpoint's."""
    hf_config = load_hf_config(source, cfg.model.trust_remote_code)
    family.check_checkpoint_config(hf_config, str(source.path / "config.json"))
    parameters, stage_parameters = parameter_counts(source, hf_config)
    deepstack = family.deepstack_layers(hf_config) > 0 and cfg.model.deepstack == "keep"
    bounds = pixel_budget(cfg, source) if image_size is None else (None, None)
    options = StageOptions(image_size=image_size, deepstack=deepstack, min_pixels=bounds[0], max_pixels=bounds[1])
    contracts = {s: family.stage(s, dynamic=options.dynamic).contract(hf_config, options) for s in STAGES}
    precision = {s: getattr(cfg.precision, s) for s in STAGES}
    final_contracts = {s: precision_contract(c, precision[s], cfg.precision) for s, c in contracts.items()}
    staging, scratch = work_dirs(final)
    return Build(cfg, family, source, final, progress, hf_config, options, parameters, stage_parameters, precision,
                 contracts, final_contracts, staging, scratch)


def pixel_budget(cfg: BuildConfig, source) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a dynamic build: vision.min_pixels / max_pixels, each null one from the
    checkpoint's preprocessor_config.json as HF's processor reads it; a bad pair is a recipe error."""
    import json

    from vlmforge.core.errors import InputError, RecipeError
    from vlmforge.host.dynamic import pixel_bounds

    where = "checkpoint preprocessor_config.json"
    lo, hi = cfg.vision.min_pixels, cfg.vision.max_pixels
    if lo is None or hi is None:
        path = checkpoint_file(Path(source.path), "preprocessor_config.json", where)
        try:
            ck_lo, ck_hi = pixel_bounds(json.loads(path.read_text()), str(path))
        except (InputError, ValueError) as exc:
            raise CheckpointError(f"vision=dynamic needs the checkpoint's pixel bounds: {exc}", where=str(path),
                                  fix="set vision.min_pixels and vision.max_pixels in the recipe") from None
        lo, hi = (ck_lo if lo is None else lo), (ck_hi if hi is None else hi)
    if lo > hi:
        raise RecipeError(f"vision=dynamic: min_pixels={lo} is larger than max_pixels={hi} (null keys come from "
                          "the checkpoint's preprocessor_config.json)", where="recipe keys vision.min_pixels/max_pixels",
                          fix="set vision.min_pixels <= vision.max_pixels")
    return int(lo), int(hi)


def precision_contract(contract, precision: str, pcfg):
    """The contract of a stage's graph in the set: a transform whose `float16_io` parameter is set makes the
    graph's float inputs and outputs float16."""
    row = TRANSFORMS.get(precision)
    flag = row.float16_io if row is not None else None
    return contract.with_float_dtype("float16") if flag and getattr(pcfg, row.params[flag]) else contract


def load_hf_config(source, trust_remote_code: bool = False):
    """The transformers config object of the checkpoint, without its weights (contracts, dims, runtime files)."""
    import transformers

    cls = getattr(transformers, source.family.hf_class).config_class
    try:
        return cls.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers validates configs with many error types (strict dataclasses, ...)
        raise CheckpointError(
            f"transformers could not read config.json: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}",
            where=str(source.path / "config.json"),
            fix="check the folder is a complete Hugging Face checkpoint of this family",
        ) from exc


# -- the nodes -------------------------------------------------------------------------------------------------------
# The stages in the order they are built: each one's files are copied into the set in the background while the next
# one exports (build.execute), so the last copy is the one nothing runs beside: the embedding's, the smallest set
# file of every family and precision (the decoder's is the largest from 4 layers on, the 32-block vision tower's
# before that).
BUILD_ORDER = ("decoder", "vision", "embedding")
# Stages whose transform, where its row can run inside the export (Transform.on_export), is applied as the stage is
# exported: no FP32 graph of them is written. The decoder: the validation compares a transformed decoder with FP32
# PyTorch, never with an FP32 decoder graph (at 3B widths one is 12 GB to write and read back; a session of it would
# hold every FP32 weight). The vision and embedding checks run the FP32 graphs behind transformed ones.
FUSED_STAGES = ("decoder",)


def fused(stage: str, precision: str) -> bool:
    """Whether `stage` at `precision` is exported straight to it (one node, no FP32 graph written or cached)."""
    return precision != "fp32" and stage in FUSED_STAGES and bool(TRANSFORMS[precision].on_export)


def plan(b: Build) -> list[Node]:
    """The nodes of the build `b`, dependencies first."""
    tools, src = toolchain(), source_inputs(b.source)
    out, finals = [], {}
    for stage in sorted(STAGES, key=BUILD_ORDER.index):
        precision = b.precision[stage]
        export = _export_node(b, stage, src, tools, N.export, behind=precision != "fp32")
        if precision == "fp32":
            out.append(export)
        elif fused(stage, precision):
            out.append(_fused_node(export, _transform_node(b, stage, precision, N.transform), N.export_transformed))
        else:
            out += [export, _transform_node(b, stage, precision, N.transform)]
        finals[stage] = out[-1].name
    exports = tuple(f"export.{s}" for s in STAGES if any(n.name == f"export.{s}" for n in out))
    runtime = Node("runtime_configs", N.runtime_configs, deps=tuple(finals.values()), slot=None, label="runtime configs",
                   inputs={"kind": "runtime_configs", "family": b.family.key, "source": src,
                           "source_files": runtime_file_hashes(b.source.path), "options": dataclasses.asdict(b.options),
                           "precision": b.precision},
                   code=codekey.runtime_configs_code(family_module(b.family.key)))
    out.append(runtime)
    if b.cfg.validate.enabled:
        out.append(_validation_node(b, finals, exports, N.validation))
    out.append(Node("manifest", N.manifest, inputs={"kind": "manifest"}, deps=tuple(n.name for n in out), slot=None,
                    output="none", label="manifest"))
    return out


def _export_node(b: Build, stage: str, src: dict, tools: dict, run: Callable, behind: bool) -> Node:
    cfg = b.cfg
    inputs = {
        "kind": "export",
        "family": b.family.key,
        "stage": stage,
        "options": {k: getattr(b.options, k) for k in STAGE_READS[stage]},
        "model": {"load_dtype": cfg.model.load_dtype, "trust_remote_code": cfg.model.trust_remote_code},
        "export_device": cfg.target.export_device,
        "source": src,
        "toolchain": tools,
    }
    return Node(f"export.{stage}", run, inputs, slot=stage, stage=stage, output="scratch" if behind else "set",
                code=codekey.export_code(b.family, family_module(b.family.key), stage, dynamic=b.options.dynamic),
                label=f"{stage} (FP32 export)" if behind else stage, done="exported in {seconds:.1f} s (cache {short})",
                timing=f"export.{stage}")


def _fused_node(export: Node, transform: Node, run: Callable) -> Node:
    """The export and the transform of a stage as one node: named, slotted and recorded as the transform (the set's
    graph is the same bytes), keyed on both nodes' inputs and code, with no FP32 export entry behind it."""
    stage, precision = transform.stage, transform.inputs["precision"]
    inputs = {"kind": "export_transformed", "export": export.inputs, "transform": transform.inputs}
    return dataclasses.replace(
        transform, run=run, inputs=inputs, deps=(), scratch=(), code=f"{export.code}+{transform.code}",
        done=f"exported to {precision} in {{seconds:.1f}} s (cache {{short}})", timing=f"export.{stage}")


def _transform_node(b: Build, stage: str, precision: str, run: Callable) -> Node:
    row = TRANSFORMS[precision]
    row.resolve()  # a typo in the table fails here, before any work (and an outside module is imported: keyed)
    inputs = {"kind": "transform", "stage": stage, "precision": precision, "row": dataclasses.asdict(row),
              "params": transform_params(row, b.cfg.precision)}
    return Node(f"transform.{stage}.{precision}", run, inputs, deps=(f"export.{stage}",),
                scratch=(f"export.{stage}",), slot=f"{stage}.{precision}", stage=stage, label=stage,
                code=codekey.transform_code(precision),
                done=f"{precision} transform done in {{seconds:.1f}} s (cache {{short}})", timing=f"transform.{stage}")


def _validation_node(b: Build, finals: dict, exports: tuple, run: Callable) -> Node:
    cfg = b.cfg
    if cfg.validate.reference not in REFERENCES:
        raise RecipeError(f"validate.reference={cfg.validate.reference!r} is not a reference kind",
                          where="recipe key validate.reference", fix=f"use one of {list(REFERENCES)}")
    if cfg.validate.weights not in ("trained", "random"):
        raise RecipeError(f"validate.weights={cfg.validate.weights!r}", where="recipe key validate.weights",
                          fix="use trained (real or trained checkpoints) or random (random-weight checkpoints)")
    images = {str(p): sha256_file(Path(p).resolve()) for p in cfg.validate.images if Path(p).is_file()}
    inputs = {"kind": "validation", "precision": b.precision, "deepstack": cfg.model.deepstack, "reference": b.reference,
              "validate": dataclasses.asdict(cfg.validate), "images": images, "providers": list(cfg.target.providers)}
    behind = tuple(f"export.{s}" for s, name in finals.items() if name != f"export.{s}" and f"export.{s}" in exports)
    deps = tuple(dict.fromkeys((*finals.values(), *exports, "runtime_configs")))
    return Node("validation", run, inputs, deps=deps, scratch=behind, slot="validation", output="none",
                label="validation", code=codekey.validation_code(b.family, family_module(b.family.key)),
                done="{checks} checks passed in {seconds:.1f} s (cache {short})",
                hit="up to date (cache {short}, {checks} checks passed)", timing="validate",
                keep=lambda record: all(c["passed"] for c in record["checks"]))


def transform_params(row, pcfg) -> dict:
    """The recipe values a transform row declares, by their precision.* key (what its cache key holds)."""
    out = {}
    for key in row.params.values():
        value = getattr(pcfg, key)
        out[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def source_inputs(source) -> dict:
    config = checkpoint_file(Path(source.path), "config.json", "checkpoint config.json")
    return {"weights": dict(sorted(source.weight_files.items())), "config.json": sha256_file(config)}


def runtime_file_hashes(source_path: Path) -> dict:
    """sha256 of the checkpoint's tokenizer, chat template and processor files (what the set copies)."""
    return {n: sha256_file(checkpoint_file(Path(source_path), n, f"checkpoint file {n}"))
            for n in RUNTIME_FILES if (Path(source_path) / n).is_file()}


def node_keys(nodes: list[Node]) -> dict[str, str]:
    """name -> key, dependencies first (a plan lists them so)."""
    keys: dict[str, str] = {}
    for n in nodes:
        keys[n.name] = digest(key_inputs(n, keys))
    return keys


def key_inputs(node: Node, keys: dict[str, str]) -> dict:
    """What `node`'s key is the digest of (kept in its cache entry: "why did this rebuild?" is a diff)."""
    return {**node.inputs, "deps": {d: keys[d] for d in node.deps}, "code": node.code}
