"""What the portal itself checks of an ONNX graph before a process that holds credentials (a web worker, a Celery
worker) hands it to onnxruntime, and whether it may run there at all.

Two questions, asked of the parsed protobuf (``onnx.load_model_from_string``, external data never loaded):

1. May any credentialed process load it? Not when any tensor keeps its data in another file, wherever the tensor
   stands (``registry.sandbox.child.external_data_references``: initializers, sparse initializers' values and
   indices, node attributes, subgraphs of If/Loop/Scan, function bodies, training info). onnxruntime reads such data
   relative to the model's folder: from the blob store, that is another team's artifact. Refused, naming why.
2. May it run in this process? Only a graph made of what the converters (skl2onnx, onnxmltools for XGBoost and
   LightGBM) emit for tabular models: ``IN_PROCESS_OPERATORS``. Everything else runs in a sandboxed model host
   (``registry.sandbox.hosts``), or not at all where there is no sandbox:

   - control flow (``Loop``, ``Scan``, ``If``, and every other operator with a subgraph), whose work is not bounded
     by the size of its input (a ``Loop`` whose trip count is an input value);
   - operators whose output size comes from the *values* of an input rather than its size: ``ConstantOfShape``,
     ``Expand``, ``Tile``, ``Range``, ``Resize``/``Upsample``, ``Pad``, ``OneHot``, ``Einsum`` (an output of any rank
     from one input), ``NonMaxSuppression``, the sequence and optional operators, random generators;
   - model-local functions, custom domains and onnxruntime's contrib operators (``com.microsoft``).

   ``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Flatten``, ``Split``, ``Slice`` and ``Gather`` stay in: their
   output never holds more elements than their inputs (``Reshape`` keeps the element count whatever its shape
   input says; ``Gather`` takes as many rows as its indices have). Operators whose output can grow with the
   input's *size* (``MatMul`` of the input by its own transpose) are bounded by the in-process limits in
   ``registry.serving.runtime``: at most ``PORTAL_ONNX_MAX_ROWS_PER_RUN`` rows per run, an arena capped at
   ``PORTAL_ONNX_MEMORY_MB`` and a deadline per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from registry.sandbox.child import external_data_references

# (domain, operator) pairs the converters emit for the models the portal converts; "" is the default ONNX domain.
_ONNX_OPERATORS = """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh BitShift Cast CastLike Ceil Celu Clip Concat Constant Cos
Cosh CumSum Div Elu Equal Erf Exp Flatten Floor Gather GatherElements Gemm Greater GreaterOrEqual HardSigmoid
Identity IsInf IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max Mean Min Mod Mul Neg Not Or Pow PRelu
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Round Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu TopK Transpose Unsqueeze Where Xor
"""
_ML_OPERATORS = """
ArrayFeatureExtractor Binarizer CastMap CategoryMapper DictVectorizer FeatureVectorizer Imputer LabelEncoder
LinearClassifier LinearRegressor Normalizer OneHotEncoder SVMClassifier SVMRegressor Scaler TreeEnsemble
TreeEnsembleClassifier TreeEnsembleRegressor ZipMap
"""
IN_PROCESS_OPERATORS: frozenset[tuple[str, str]] = frozenset(
    [("", op) for op in _ONNX_OPERATORS.split()] + [("ai.onnx", op) for op in _ONNX_OPERATORS.split()]
    + [("ai.onnx.ml", op) for op in _ML_OPERATORS.split()])
IN_PROCESS_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
# What onnxruntime's dynamic quantization adds to a converted graph (weights as int8, activations quantized per run):
# standard operators of bounded cost, allowed in-process only where the portal quantized a proven form itself (an
# edge package's int8 form, measured on the reference rows); never for an uploaded or served graph.
QUANTIZATION_OPERATORS: frozenset[tuple[str, str]] = frozenset(
    (domain, op) for domain in ("", "ai.onnx")
    for op in ("DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "ConvInteger"))
# Named in the deployment log when they are the reason: what the in-process path leaves to the sandbox on purpose.
CONTROL_FLOW = frozenset({"Loop", "Scan", "If"})
SHAPE_FROM_INPUT = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
                              "Einsum", "NonMaxSuppression", "SequenceConstruct", "SplitToSequence",
                              "ConcatFromSequence", "RandomNormalLike", "RandomUniformLike", "Multinomial"})


class OnnxRefused(Exception):
    """The graph may not be loaded by a process that holds credentials (nor kept as a serving form)."""


class OnnxSandboxOnly(Exception):
    """The graph may be loaded, but only a sandboxed model host may run it (``OnnxReview.sandbox_reasons``)."""


@dataclass
class OnnxReview:
    model: Any
    external: list[dict[str, str]] = field(default_factory=list)
    operators: set[tuple[str, str]] = field(default_factory=set)
    functions: list[str] = field(default_factory=list)
    custom_domains: list[str] = field(default_factory=list)

    @property
    def refusal(self) -> str:
        """Why no credentialed process may load this graph ("" when it may)."""
        if not self.external:
            return ""
        first = self.external[0]
        more = f" (and {len(self.external) - 1} more)" if len(self.external) > 1 else ""
        return (f"tensor {first['tensor']!r} at {first['where']} keeps its data in another file "
                f"({first['location']!r}){more}; the portal loads ONNX graphs only with every tensor inside the "
                "file, because onnxruntime would read that file from the folder the model sits in")

    @property
    def sandbox_reasons(self) -> list[str]:
        """Why this graph runs only in a sandboxed model host (empty: it may run in this process)."""
        return self.reasons_beyond(IN_PROCESS_OPERATORS)

    def reasons_beyond(self, allowed: frozenset[tuple[str, str]]) -> list[str]:
        """Why this graph may not run in this process when ``allowed`` are the operators it may use."""
        outside = sorted(op for op in self.operators if op not in allowed)
        reasons = []
        flow = sorted({op for _d, op in outside if op in CONTROL_FLOW})
        shaped = sorted({op for _d, op in outside if op in SHAPE_FROM_INPUT})
        local = {tuple(name.rsplit(":", 1)) if ":" in name else ("", name) for name in self.functions}
        other = sorted({f"{d}:{op}" if d else op for d, op in outside
                        if op not in CONTROL_FLOW and op not in SHAPE_FROM_INPUT and (d, op) not in local})
        if flow:
            reasons.append("control flow (" + ", ".join(flow) + ")")
        if shaped:
            reasons.append("operators sized by input values (" + ", ".join(shaped) + ")")
        if self.functions:
            reasons.append("model-local functions (" + ", ".join(self.functions[:5]) + ")")
        if self.custom_domains:
            reasons.append("operator sets outside onnxruntime's standard ones ("
                           + ", ".join(repr(d) for d in self.custom_domains[:5]) + ")")
        if other:
            reasons.append("operators the converters do not emit (" + ", ".join(other[:8]) + ")")
        return reasons


def review_onnx(data: bytes) -> OnnxReview:
    """Parse ``data`` (never reading external data) and say what it holds. Raises ``OnnxRefused`` for a file that
    is not an ONNX model."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # a malformed protobuf of any kind
        raise OnnxRefused(f"not a readable ONNX model ({type(exc).__name__})") from None
    if not len(model.graph.node) and not len(model.graph.output):
        raise OnnxRefused("not a readable ONNX model (no graph)")
    review = OnnxReview(model=model, external=external_data_references(model))
    graphs: list[Any] = [model.graph]
    bodies: list[Any] = list(model.functions)
    review.functions = sorted(f"{f.domain}:{f.name}" if f.domain else f.name for f in model.functions)
    while graphs or bodies:
        nodes = graphs.pop().node if graphs else bodies.pop().node
        for node in nodes:
            review.operators.add((node.domain, node.op_type))
            for attribute in node.attribute:  # subgraphs, whatever the attribute's type field says
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
    domains = {op.domain for op in model.opset_import} | {d for d, _op in review.operators}
    review.custom_domains = sorted(domains - IN_PROCESS_DOMAINS)
    return review


def checked_onnx(data: bytes) -> OnnxReview:
    """The review of a graph a credentialed process is about to load: refused (``OnnxRefused``, naming why) when
    any tensor keeps its data in another file."""
    review = review_onnx(data)
    if review.refusal:
        raise OnnxRefused(review.refusal)
    return review
