"""ONNX models as candidates: ``siglip-parity --candidate model.onnx`` (onnxruntime, the ``[onnx]`` extra).

Sites are found in the graph by the module path its node names carry (``/vision_model/encoder/layers.3/mlp/
fc1/MatMul``: what ``torch.onnx.export`` writes for a model with hub module paths; other paths map to
canonical sites through ``--rename``, the same module-path rules a PyTorch candidate uses). A site's
*output* is the one value its scope produces that something outside the scope consumes; its *input* is
the one non-constant value the scope consumes from outside.

- **Propagated**: the graph runs once in onnxruntime with every site's output added as a graph output.
- **Isolated**: each site's sub-graph (``onnx.utils.Extractor``, from its input value to its output value)
  runs on the reference's input to that site, which the harness hands in exactly as it teacher-forces a
  PyTorch module.

Both go through the harness unchanged: the graph is replayed through a `replay.ReplayTree` with the canonical site
names, like `activations.ActivationCandidate`. NaFlex graphs (three inputs, masks) are not supported yet.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siglip_scratch.errors import InputError, SourceError

from ..sites import EMBEDDINGS, RenameRules, apply_rename, site_names
from .base import Candidate
from .loading import LoadResult
from .replay import ReplayTree

__all__ = ["OnnxCandidate"]

_CONSTANT_OPS = ("Constant", "ConstantOfShape")


def _require():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise InputError(
            "ONNX candidates need onnxruntime and onnx, which are not installed",
            "--candidate",
            'pip install "siglip-scratch[onnx]"',
        ) from None
    return onnx, onnxruntime


def _module_path(node: Any) -> str | None:
    """The module path a node was exported from, as either exporter records it.

    The legacy exporter writes it into the node name (``/vision_model/encoder/layers.0/mlp/fc1/MatMul``); the dynamo
    exporter (``torch.onnx.export(..., dynamo=True)``, the default from torch 2.9) names nodes ``node_MatMul_6`` and
    keeps the scopes in the ``pkg.torch.onnx.name_scopes`` metadata: ``['', 'vision_model', …,
    'vision_model.encoder.layers.0.mlp.fc1', 'linear']`` (the root, each enclosing module's full path, the op).
    Either gives ``vision_model.encoder.layers.0.mlp.fc1``; a node outside every module gives None.
    """
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if not isinstance(scopes, list) or len(scopes) < 2 or scopes[0] != "":
                return None  # not under the exported module (shape bookkeeping the exporter adds)
            modules = [s for s in scopes[1:-1] if isinstance(s, str) and s]
            return modules[-1] if modules else None
    if not node.name.startswith("/"):
        return None
    parts = node.name.split("/")[1:-1]
    return ".".join(parts) if parts else None


# ONNX TensorProto element types of floating-point data: a site's input and output are these; integer values are
# shape bookkeeping (a dynamic batch size read with Shape), never a site's data.
_FLOAT_TYPES = {1, 10, 11, 16}


def _constants(graph: Any) -> set[str]:
    """Values that do not depend on the graph's input: initializers, Constant outputs, and everything computed from
    those alone (an optimiser's Split of a fused weight, the Identity a deduplicated initializer becomes)."""
    constants = {t.name for t in graph.initializer}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type in _CONSTANT_OPS or all(not i or i in constants for i in node.input):
            constants.update(node.output)
    return constants


def _elem_types(model: Any) -> dict[str, int]:
    graph = model.graph
    out = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    out.update({t.name: t.data_type for t in graph.initializer})
    return out


class OnnxCandidate(Candidate):
    """An ONNX graph judged as a candidate (see module doc). Opening checks that onnxruntime is installed and the
    file exists; `load` reads the graph and finds the sites."""

    kind = "onnx"
    rerunnable = False

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__()
        _require()
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError("ONNX model not found", str(self.path), "check the path")

    def check_run(self, dtype: str) -> None:
        if dtype != "float32":
            raise InputError(
                f"an ONNX candidate runs in its graph's float32, not {dtype}", "--dtype", "use --dtype float32"
            )

    def load(self, config, state, rules, *, names, attn, allowed, infer) -> LoadResult:
        onnx, ort = _require()
        sites = site_names(config, "fine")
        try:
            self.model = onnx.shape_inference.infer_shapes(onnx.load(str(self.path)))
        except Exception as exc:  # onnx raises its own types for a corrupt file
            raise InputError(f"not a readable ONNX model ({type(exc).__name__}: {exc})", str(self.path), None) from None
        graph = self.model.graph
        if len([i for i in graph.input if i.name not in {t.name for t in graph.initializer}]) != 1:
            raise InputError(
                "the graph takes more than one input (SigLIP 2 NaFlex graphs are not supported yet)",
                str(self.path),
                "export a fixed-resolution tower taking pixel_values [B, 3, H, W]",
            )
        self.input_name = next(i.name for i in graph.input if i.name not in {t.name for t in graph.initializer})
        self.sites = list(sites)
        self.ios = self._find_sites(graph, rules)
        self.ort = ort
        self.info = {
            "impl": f"onnx {self.path}",
            "framework": "ONNX Runtime",
            "runtime": f"onnxruntime {ort.__version__}, opset {max(o.version for o in self.model.opset_import)}",
            "version": ort.__version__,
            "attn": "n/a",
            "site_values": {s: {"input": i, "output": o} for s, (i, o) in self.ios.items()},
        }
        self.run_mode = "propagated"
        self._stored: dict[str, torch.Tensor] = {}
        self._aux_values: dict[str, np.ndarray] = {}
        self._sessions: dict[str, Any] = {}
        self.module = ReplayTree(self, [s for s in self.sites if s in self.ios])
        return LoadResult(via="the ONNX graph's own initializers")

    # -- graph analysis ------------------------------------------------------------------------------------
    def _find_sites(self, graph: Any, rename: RenameRules) -> dict[str, tuple[str, str]]:
        constants = _constants(graph)
        types = _elem_types(self.model)
        # Shape bookkeeping computed from the input (a dynamic batch size read with Shape): never a site's data
        # input or output, but a sub-graph run alone needs it fed (`aux`).
        bookkeeping = {v for v, t in types.items() if t and t not in _FLOAT_TYPES and v not in constants}
        self.aux: dict[str, list[str]] = {}
        produced_by: dict[str, int] = {}
        for idx, node in enumerate(graph.node):
            for o in node.output:
                produced_by[o] = idx
        consumers: dict[str, list[int]] = {}
        for idx, node in enumerate(graph.node):
            for i in node.input:
                consumers.setdefault(i, []).append(idx)
        graph_outputs = {o.name for o in graph.output}

        def canonical(path: str) -> str:
            name = apply_rename(path, rename) if rename else path
            return name if name.startswith("vision_model") else f"vision_model.{name}"  # 5.x saves flat

        members: dict[str, list[int]] = {}
        for idx, node in enumerate(graph.node):
            path = _module_path(node)
            if path is None:
                continue
            parts = path.split(".")
            for k in range(1, len(parts) + 1):  # every enclosing module
                members.setdefault(canonical(".".join(parts[:k])), []).append(idx)
        ios: dict[str, tuple[str, str]] = {}
        for site in self.sites:
            idxs = set(members.get(site, []))
            if not idxs:
                continue
            outs = [
                o
                for i in sorted(idxs)
                for o in graph.node[i].output
                if o not in constants and (o in graph_outputs or any(c not in idxs for c in consumers.get(o, [])))
            ]
            external = sorted(
                {
                    v
                    for i in idxs
                    for v in graph.node[i].input
                    if v and v not in constants and produced_by.get(v) not in idxs
                }
            )
            external = [v for v in external if v == self.input_name or produced_by.get(v) is not None]
            ins = [v for v in external if v not in bookkeeping]
            self.aux[site] = [v for v in external if v in bookkeeping]
            outs = [o for o in outs if o not in bookkeeping]
            if len(outs) != 1 or len(ins) != 1:
                raise InputError(
                    f"cannot tell {site}'s output and input in the graph (outputs {outs[:3]}, inputs {ins[:3]})",
                    str(self.path),
                    "export with torch.onnx.export (legacy or dynamo) of a module with hub paths, or map them with --rename",
                )
            ios[site] = (ins[0], outs[0])
        if not ios:
            raise InputError(
                "no canonical site found in the graph (node names or pkg.torch.onnx.name_scopes metadata)",
                str(self.path),
                "export with torch.onnx.export from a model with hub module paths, or map its paths with --rename",
            )
        return ios

    # -- running ---------------------------------------------------------------------------------------------
    def _session(self, key: str, model: Any) -> Any:
        if key not in self._sessions:
            options = self.ort.SessionOptions()
            options.log_severity_level = 3
            self._sessions[key] = self.ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[key]

    def _wanted(self) -> set[str]:
        """The values a run must give back: every site's input and output, and the bookkeeping its sub-graph needs."""
        return {v for pair in self.ios.values() for v in pair} | {v for vs in self.aux.values() for v in vs}

    def _full(self) -> Any:
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        have = {o.name for o in model.graph.output}
        for value in self._wanted() - {self.input_name}:
            if value not in have:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(value))
                have.add(value)
        return model

    def to(self, device: str, dtype: torch.dtype) -> None:
        pass  # onnxruntime runs the graph on the CPU in its own dtype; outputs come back as CPU tensors

    def set_mode(self, mode: str) -> None:
        self.run_mode = mode

    def emit(self, site: str, x: torch.Tensor | None) -> torch.Tensor:
        if self.run_mode == "propagated" or site == EMBEDDINGS or x is None:
            return self._stored[site]
        import onnx

        src, dst = self.ios[site]
        aux = self.aux.get(site, [])
        if site not in self._sessions:
            sub = onnx.utils.Extractor(self.model).extract_model([src, *aux], [dst])
            self._session(site, sub)
        feed = {src: x.detach().cpu().numpy(), **{v: self._aux_values[v] for v in aux}}
        out = self._sessions[site].run([dst], feed)[0]
        return torch.from_numpy(np.ascontiguousarray(out))

    def replay(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        session = self._session("full", self._full())
        feed = pixel_values.detach().cpu().numpy()
        declared = self.model.graph.input[[i.name for i in self.model.graph.input].index(self.input_name)]
        dims = declared.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value != feed.shape[0]:
            raise InputError(
                f"the graph's batch is fixed at {dims[0].dim_value}, the run has {feed.shape[0]} images",
                str(self.path),
                f"pass --batch {dims[0].dim_value}, or export with a dynamic batch axis (dynamic_axes / dynamic_shapes)",
            )
        wanted = sorted(self._wanted() - {self.input_name})
        by_value = dict(zip(wanted, session.run(wanted, {self.input_name: feed}), strict=True))
        by_value[self.input_name] = feed
        self._aux_values = {v: by_value[v] for vs in self.aux.values() for v in vs}

        def tensor(value: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(by_value[value]))

        self._stored = {s: tensor(o) for s, (_, o) in self.ios.items()}
        for site in self.sites:
            if site in self.ios:
                # Each site is called on its own input from this run; in isolated mode the harness replaces
                # that with the reference's input (teacher forcing) before the sub-graph runs on it.
                yield site, tensor(self.ios[site][0])
