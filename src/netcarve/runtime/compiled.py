"""``netcarve.runtime.compile``: a model (or a saved run) -> one native callable, sparse where it is faster.

Steps: lower the eval-mode model to a plan (:mod:`netcarve.runtime.plan`: BN folded, ReLU / residual
additions fused), build it natively, then autotune: the whole plan is profiled once per kernel kind (every
layer on ATen's dense kernel, every conv on netcarve's dense direct kernel, every layer sparse; the same
activations flow through all), and each layer keeps the fastest kernel on this CPU at the example's shape.
Decisions are cached per CPU model, kernel source, thread count, input shape and layer
(``$NETCARVE_CACHE/autotune/<cpu>-<kernel source hash>.json``: changed kernels are re-timed, never judged by
an older build's timings), so recompiling the same model is instant. Without a C++
compiler (or ``NETCARVE_KERNELS=off``) the plain-PyTorch twin of the plan runs instead, and
``CompiledModel.native`` is False.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..graph.trace import ordered_inputs
from ._build import cache_root, cpu_key, load_kernels, source_hash
from .lanes import LANES_MIN_BATCH, lanes_conv_ok, lanes_rewrite
from .plan import Lowering, Op, ReferencePlan, as_inputs, build_native

logger = logging.getLogger(__name__)

SPARSE_MODES = ("auto", "always", "never")


@dataclass
class LayerChoice:
    """One conv / linear / recurrent layer of a compiled model: its kernel choice and the timings behind it
    (``shape``: its (first) weight's shape; ``macs`` / ``nonzero_macs`` for the example batch)."""

    name: str
    kind: str
    shape: list[int]
    density: float
    macs: int
    nonzero_macs: int
    # "sparse", "dense" (ATen: oneDNN / MKL), "direct" (netcarve's dense conv kernel: the register-blocked one, or
    # for depthwise convs the depthwise one; for linears and GRU / LSTM gate matmuls the dense panel kernel),
    # "generated" or "lanes" (the lanes
    # layout: 16 images per vector)
    choice: str
    sparse_ms: float | None = None
    dense_ms: float | None = None
    direct_ms: float | None = None
    cached: bool = False
    generated_ms: float | None = None  # (compile(..., codegen=True): the layer's generated code)


TUNABLE = ("conv", "linear", "rnn")


def _weights(op: Op) -> list[torch.Tensor]:
    return op.p["dense"][::2] if op.kind == "rnn" else [op.p["weight"]]


def _eligible(op: Op) -> bool:
    return op.kind in ("linear", "rnn") or (op.kind == "conv" and op.p["groups"] == 1)


def _depthwise(op: Op) -> bool:
    """A depthwise conv (groups = in = out channels): its "direct" candidate is netcarve's depthwise kernel."""
    if op.kind != "conv" or op.p["groups"] == 1:
        return False
    w = op.p["weight"]
    return w.dim() == 4 and w.shape[1] == 1 and w.shape[0] == op.p["groups"]


def _macs(op: Op) -> tuple[int, int]:
    """(dense MACs, MACs with a non-zero weight) of one tunable op for the example batch."""
    ws = _weights(op)
    if op.kind == "conv":
        out = op.out_shape or (1, ws[0].shape[0], 1, 1)
        reps = out[0] * out[2] * out[3]
    elif op.kind == "linear":
        out = op.out_shape or (1, ws[0].shape[0])
        reps = int(torch.tensor(out[:-1]).prod()) if len(out) > 1 else 1
    else:  # rnn: every matrix once per step and sequence
        shape = op.in_shape or (1, 1, 1)
        reps = shape[0] * shape[1]
    return sum(int(w.numel()) for w in ws) * reps, sum(int((w != 0).sum()) for w in ws) * reps


def _signature(op: Op, x_shape: tuple[int, ...], threads: int) -> str:
    h = hashlib.sha1()
    opts = {k: v for k, v in op.p.items() if isinstance(v, (int, float, bool, str))}
    h.update(json.dumps([op.kind, list(op.in_shape or ()), list(x_shape), threads, len(op.inputs),
                         sorted(opts.items())]).encode())
    for w in _weights(op):
        h.update(json.dumps(list(w.shape)).encode())
        h.update((w != 0).numpy().tobytes())
    return h.hexdigest()[:20]


class _TuneCache:
    def __init__(self):
        self.path = cache_root() / "autotune" / f"{cpu_key()}-{source_hash()}.json"
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            self.data = {}

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache only costs re-tuning
            logger.warning("cannot write the autotune cache %s: %s", self.path, e)


class CompiledModel:
    """A model compiled to one native plan. Call it like the model (eval-mode semantics, no autograd)."""

    def __init__(self, ops: list[Op], nvals: int, output: int, plan, example_shape: tuple[int, ...],
                 layers: list[LayerChoice], threads: int, dtype: torch.dtype = torch.float32,
                 inputs: list[tuple[tuple[int, ...], torch.dtype]] | None = None,
                 input_names: list[str] | None = None):
        self.ops, self.nvals, self.output = ops, nvals, output
        self._plan = plan
        self._reference = ReferencePlan(ops, nvals, output)
        # (shape, dtype) of each input the plan takes (values 0 .. n-1; the model's forward arguments in order); calls
        # may change the batch (dim 0) of every input, not the other sizes
        self.inputs = list(inputs) if inputs else [(tuple(example_shape), dtype)]
        self.example_shape, self.dtype = self.inputs[0]
        # the inputs' forward argument names when compiled from a dict (then calls may pass them by keyword)
        self.input_names = list(input_names) if input_names else None
        self.layers = layers
        self.threads = threads
        # whole-plan check of the autotuned choices (sparse="auto"): ms per variant and the one kept, or None
        self.plan_check: dict[str, Any] | None = None
        # a plan in the lanes layout kept by lanes="auto": calls with fewer images than this run the plan without it
        # (_small: that plan, its ops and its layers' kernel choices); a group of 16 images costs the same as one
        self.lanes_min_batch = 0
        self._small: tuple[Any, list[Op], dict[str, str]] | None = None
        # compile(dynamic=True): the model and options to compile a plan for other non-batch sizes on first use, and
        # those plans by input shapes (least recently used first)
        self._dynamic: dict[str, Any] | None = None
        self._variants: OrderedDict[tuple, CompiledModel] = OrderedDict()
        # a model fx cannot trace, captured by torch.export with the example's batch (where torch.export could not keep
        # it symbolic): a call of another batch needs its own plan as well (dynamic=True), not only other sizes
        self.fixed_batch = False

    def _key_shape(self, shape) -> tuple[int, ...]:
        return tuple(shape) if self.fixed_batch else tuple(shape[1:])

    @property
    def dynamic(self) -> bool:
        """Whether calls may change the non-batch sizes (``compile(..., dynamic=True)``)."""
        return self._dynamic is not None

    @property
    def shapes(self) -> list[list[tuple[int, ...]]]:
        """The non-batch sizes of the inputs of every plan kept: the example's first, then those compiled for calls
        (``dynamic=True``), least recently used first (the whole shapes, batch included, for a ``fixed_batch``
        model)."""
        return [[self._key_shape(s) for s, _ in self.inputs]] + [[s for s, _ in key] for key in self._variants]

    def _for_shapes(self, xs: tuple) -> CompiledModel:
        """The compiled model for these call inputs: self, or with ``dynamic=True`` and other non-batch sizes the
        plan compiled for them (on first use, with this plan's per-layer kernel choices)."""
        if self._dynamic is None or len(xs) != len(self.inputs) or not all(isinstance(x, torch.Tensor) for x in xs):
            return self
        key = tuple((self._key_shape(x.shape), x.dtype) for x in xs)
        if key == tuple((self._key_shape(s), d) for s, d in self.inputs) or any(
                x.dtype != d or x.dim() != len(s) for x, (s, d) in zip(xs, self.inputs)):
            return self  # (another dtype or number of dimensions than the example's gets _args' error)
        if key in self._variants:
            self._variants.move_to_end(key)
            return self._variants[key]
        d = self._dynamic
        example = dict(zip(self.input_names, xs)) if self.input_names else xs if len(xs) > 1 else xs[0]
        logger.info("runtime.compile(dynamic=True): %s: compiling a plan for the input sizes %s (%d kept)",
                    type(d["model"]).__name__, "; ".join(str(tuple(x.shape)) for x in xs), len(self._variants) + 1)
        if key in d["dropped"] and not d["warned"]:
            d["warned"] = True
            logger.warning("runtime.compile(dynamic=True): %s: compiling a plan again for input sizes whose plan was "
                           "dropped (more than max_shapes=%d sizes in use); a larger max_shapes keeps them",
                           type(d["model"]).__name__, d["max_shapes"])
        v = compile(d["model"], example, **d["options"],
                    _choices={lc.name: "sparse" if lc.choice == "lanes" else lc.choice for lc in self.layers},
                    _share=self.ops)
        self._variants[key] = v
        while len(self._variants) > d["max_shapes"] - 1:
            d["dropped"].add(self._variants.popitem(last=False)[0])
        return v

    def _small_call(self, x) -> bool:
        """Whether this input runs the plan without the lanes layout (fewer images than ``lanes_min_batch``)."""
        return self._small is not None and isinstance(x, torch.Tensor) and x.dim() >= 1 and \
            x.shape[0] < self.lanes_min_batch

    def _args(self, xs: tuple) -> torch.Tensor | list[torch.Tensor]:
        """Checked call inputs as the native plan takes them: the tensor, or a list of the tensors."""
        n = len(self.inputs)
        if len(xs) != n:
            raise ConfigError(f"compiled model: expected {n} input{'s' if n > 1 else ''} "
                              f"({self._describe()}), got {len(xs)}")
        for i, (x, (shape, dtype)) in enumerate(zip(xs, self.inputs)):
            what = f"input {i + 1} " if n > 1 else "input "
            if not isinstance(x, torch.Tensor) or x.dim() != len(shape) or \
                    self._key_shape(x.shape) != self._key_shape(shape):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                hint = ("" if not isinstance(x, torch.Tensor) or self.dynamic
                        else " (captured by torch.export at the example's sizes, batch included: compile with "
                        "dynamic=True to allow others)" if self.fixed_batch
                        else " (the plan is compiled for these sizes; only the batch may change unless compiled with "
                        "dynamic=True)")
                want = tuple(shape) if self.fixed_batch else f"(N, {', '.join(map(str, shape[1:]))})"
                raise ConfigError(f"compiled model: expected {what}{want}, got {got}{hint}")
            if x.dtype != dtype:
                raise ConfigError(f"compiled model: expected a {str(dtype).replace('torch.', '')} {what.strip()}, "
                                  f"got {x.dtype}")
        return xs[0].detach() if n == 1 else [x.detach() for x in xs]

    def _describe(self) -> str:
        return "; ".join(f"(N, {', '.join(map(str, s[1:]))}) {str(d).replace('torch.', '')}" for s, d in self.inputs)

    @property
    def native(self) -> bool:
        return self._plan is not None

    @property
    def fallback(self) -> list[str]:
        """The model's nodes that run as "python" steps (PyTorch inside the plan), e.g. ``"module 'norm'
        (LayerNorm)"``; empty when the whole model is lowered natively."""
        return [n for op in self.ops if op.kind == "python" for n in op.p["nodes"]]

    def _as_tuple(self, x) -> tuple:
        """time() / profile()'s input: a tensor, a tuple of the inputs, or a dict of them by name."""
        if isinstance(x, dict):
            return self._by_keyword((), x)
        return tuple(x) if isinstance(x, (tuple, list)) else (x,)

    def _by_keyword(self, xs: tuple, kw: dict) -> tuple:
        """Call inputs given by keyword (a model compiled from a dict) as the tuple in the plan's order."""
        if not kw:
            return xs
        if xs or not self.input_names or set(kw) != set(self.input_names):
            want = ", ".join(self.input_names) if self.input_names else "positional inputs (compiled from a tuple)"
            raise ConfigError(f"compiled model: expected the inputs {want}, got {len(xs)} positional and "
                              f"{', '.join(kw) or 'no'} keyword")
        return tuple(kw[k] for k in self.input_names)

    def __call__(self, *xs: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        """Run the plan on the model's inputs (one tensor, or as many as the example input had, in order; by keyword
        when compiled from a dict)."""
        xs = self._by_keyword(xs, kw)
        v = self._for_shapes(xs)
        if v is not self:
            return v(*xs)
        a = self._args(xs)
        if self._plan is None:
            return self._reference.run(*xs)
        return (self._small[0] if self._small_call(a) else self._plan).run(a)

    def reference(self, *xs: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        """The same plan run with plain PyTorch ops (the reference twin)."""
        xs = self._by_keyword(xs, kw)
        v = self._for_shapes(xs)
        if v is not self:
            return v.reference(*xs)
        self._args(xs)
        return self._reference.run(*xs)

    def time(self, x: torch.Tensor | tuple[torch.Tensor, ...], repeats: int = 50, warmup: int = 10) -> float:
        """Median whole-model latency in ms, timed inside the native plan (no Python between layers). ``x``: the
        input, or a tuple of the inputs of a model that takes several."""
        if self._plan is None:
            raise ConfigError("compiled model: not native (no compiled kernels); time the reference with netcarve bench")
        v = self._for_shapes(self._as_tuple(x))
        if v is not self:
            return v.time(x, repeats, warmup)
        a = self._args(self._as_tuple(x))
        return float((self._small[0] if self._small_call(a) else self._plan).time(a, repeats, warmup))

    def profile(self, x: torch.Tensor | tuple[torch.Tensor, ...], repeats: int = 30,
                warmup: int = 5) -> list[dict[str, Any]]:
        """Per step: name, kind, kernel and median milliseconds (each step timed inside the native plan). ``x``: the
        input, or a tuple of the inputs."""
        if self._plan is None:
            raise ConfigError("compiled model: not native (no compiled kernels)")
        v = self._for_shapes(self._as_tuple(x))
        if v is not self:
            return v.profile(x, repeats, warmup)
        a = self._args(self._as_tuple(x))
        plan, ops, choice = (self._small if self._small_call(a)
                             else (self._plan, self.ops, {lc.name: lc.choice for lc in self.layers}))
        ms = plan.profile(a, repeats, warmup)
        # max pooling, global average pooling and option-A shortcuts run netcarve's kernels unless switched off
        native = {"maxpool", "gap", "shortcut"} if load_kernels().native_pool() else set()
        native |= {"lanes_in", "lanes_out"}
        return [{"name": op.name, "kind": op.kind,
                 "kernel": "python" if op.kind == "python" else choice.get(op.name, "native" if op.kind in native
                                                                          else "aten"), "ms": float(t)}
                for op, t in zip(ops, ms)]

    def summary(self) -> dict[str, Any]:
        return {"native": self.native, "threads": self.threads, "example_shape": list(self.example_shape),
                "inputs": [{"shape": list(sh), "dtype": str(d).replace("torch.", "")} for sh, d in self.inputs],
                "input_names": self.input_names, "dynamic": self.dynamic,
                "shapes": [[list(s) for s in sh] for sh in self.shapes],
                "steps": len(self.ops), "layers": [asdict(lc) for lc in self.layers],
                "sparse_layers": sum(lc.choice == "sparse" for lc in self.layers), "plan_check": self.plan_check,
                "python_steps": sum(op.kind == "python" for op in self.ops), "fallback": self.fallback}


def _resolve(model_or_checkpoint) -> nn.Module:
    if isinstance(model_or_checkpoint, nn.Module):
        return model_or_checkpoint
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        from ..serialize import load

        return load(model_or_checkpoint)
    raise ConfigError(f"runtime.compile: expected an nn.Module or a checkpoint path, got "
                      f"{type(model_or_checkpoint).__name__}")


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS: torch allocates every
    activation afresh, and above glibc's mmap threshold (128 KiB) each allocation is a fresh mmap whose pages
    fault in on first touch (measured: ResNet-56 at batch 1 varied 1.0-3.9 ms across processes without this,
    0.86-0.87 ms with it). Process-wide; ``NETCARVE_NO_MALLOPT=1`` skips it."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("NETCARVE_NO_MALLOPT") == "1":
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@torch.no_grad()
def compile(model_or_checkpoint, example_input: torch.Tensor | tuple[torch.Tensor, ...], *,  # noqa: A001
            sparse: str = "auto",
            threads: int | None = None, repeats: int = 20, use_cache: bool = True,
            codegen: bool = False, fallback: bool = True, lanes: str = "auto", dynamic: bool = False,
            max_shapes: int = 8, _choices: dict[str, str] | None = None,
            _share: list[Op] | None = None) -> CompiledModel:
    """Compile a model (or a checkpoint directory saved by netcarve) for this CPU.

    Args:
        example_input: a float32 batch of the shape to tune for (other batch sizes run too), or integer token ids;
            for a model of several inputs a tuple of them, in the order of its forward arguments (e.g. ``(input_ids,
            attention_mask)``); the compiled model is then called with as many tensors.
        sparse: ``"auto"`` (each layer takes the fastest of its kernels measured here: sparse, ATen dense and,
            for convs, netcarve's dense direct conv), ``"always"`` (every groups=1 conv, linear and recurrent
            layer runs sparse) or ``"never"`` (the fastest dense kernel per layer: the dense baseline).
        threads: torch threads to use while tuning (default: the current setting).
        repeats: profiling runs per variant when tuning.
        use_cache: read / write the per-CPU autotune cache.
        codegen: also offer sparse convs (groups=1) their own generated code (:mod:`netcarve.runtime.codegen`:
            the layer's weights compiled in; AVX-512 hosts with a C++ compiler). Each such layer is compiled once
            per machine (seconds per layer, cached) and keeps it only where it measures faster; with
            ``sparse="always"`` a layer takes the faster of the sparse and the generated kernel.
        fallback: parts of the model the plan cannot lower natively (layer types and tensor ops without a native
            step: LayerNorm, GELU, attention, reshapes, ...) run as "python" steps, each a sub-graph of the model run
            by PyTorch inside the plan (``CompiledModel.fallback`` names them; a log line says so). ``False``: raise
            an :class:`~netcarve.errors.UnsupportedModelError` naming the first such module instead.
        lanes: ``"auto"`` (at batches of 16 and more, runs of sparse convs and 2x2 max poolings are also tried in
            the lanes layout, 16 images per vector (:mod:`netcarve.runtime.lanes`), kept where the whole plan runs
            faster; their layers report ``choice="lanes"``; calls with fewer than 16 images then run the plan
            without it), ``"always"`` (that rewrite at any batch, untimed, for every call) or ``"never"``.
        dynamic: calls may also change the inputs' other sizes (a sequence length, an image size): a call whose
            non-batch sizes differ from the example's gets a plan compiled for them on first use, lowered from the
            model as it is then, each layer on the kernel this compile chose for it (no new timing; lanes only with
            ``lanes="always"``), and kept for later calls of those sizes. ``False``: such a call is an error.
            (A model fx cannot trace, e.g. a Hugging Face transformers model, is compiled from its torch.export
            capture, whose batch is symbolic where the model allows; where it is not, ``fixed_batch`` is set and
            another batch is a size change too.)
        max_shapes: with ``dynamic``, how many plans (the example's included) are kept; beyond, the least recently
            used one is dropped (and compiled again if needed).
    """
    if sparse not in SPARSE_MODES:
        raise ConfigError(f"runtime.compile: sparse must be one of {', '.join(SPARSE_MODES)}, got {sparse!r}")
    if lanes not in LANES_MODES:
        raise ConfigError(f"runtime.compile: lanes must be one of {', '.join(LANES_MODES)}, got {lanes!r}")
    if dynamic and (isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1):
        raise ConfigError(f"runtime.compile: max_shapes must be an integer >= 1, got {max_shapes!r}")
    model = _resolve(model_or_checkpoint)
    xs = as_inputs(example_input, model)
    for t in xs:
        if not (t.dtype == torch.float32 or (not t.is_floating_point() and not t.is_complex())):
            raise ConfigError("runtime.compile: example_input must be a float32 tensor (a batch of the model's input) "
                              f"or integer token ids (or a tuple of such), got {t.dtype}")
    names = ordered_inputs(model, example_input)[1]  # inputs given by name: for calls by keyword
    was_training = model.training
    model.eval()
    try:
        lowering = Lowering(model, example_input if names else xs if len(xs) > 1 else xs[0], fallback)
        ops, nvals, output = lowering.run()
    finally:
        model.train(was_training)
    if _share:
        _share_payloads(ops, _share)
    for i, t in enumerate(xs):
        if t.dtype == torch.float32:
            continue
        # token ids, masks: native steps other than embeddings and comparisons compute in float32; a bool input may
        # be an attention step's padding / attention mask (read after its first input)
        bad = [op for op in ops if i in op.inputs and op.kind not in ("embedding", "python", "compare")
               and not (t.dtype == torch.bool and op.kind in ("mha", "padzero") and i not in op.inputs[:1])]
        if bad:
            which = f"input {i + 1} ({t.dtype})" if len(xs) > 1 else "the integer input"
            raise UnsupportedModelError(f"runtime.compile: {type(model).__name__}: step {bad[0].name!r} "
                                        f"({bad[0].kind}) reads {which}; natively only an Embedding (or a "
                                        "comparison with a number, a padding mask) takes token ids")
    specs = [(tuple(t.shape), t.dtype) for t in xs]
    dyn = {"model": model, "max_shapes": max_shapes, "dropped": set(), "warned": False, "options": dict(
        sparse=sparse, repeats=repeats, use_cache=use_cache, codegen=codegen, fallback=fallback,
        lanes="always" if lanes == "always" else "never")} if dynamic else None
    px = xs[0] if len(xs) == 1 else list(xs)  # the example as the native plan takes it
    fallen = [n for op in ops if op.kind == "python" for n in op.p["nodes"]]
    if fallen:
        steps = sum(op.kind == "python" for op in ops)
        logger.info("runtime.compile: %s: %d of %d plan steps run in PyTorch (not native): %s",
                    type(model).__name__, steps, len(ops),
                    "; ".join(fallen[:8]) + (f"; ... ({len(fallen)} nodes)" if len(fallen) > 8 else ""))
    if threads is not None:
        torch.set_num_threads(int(threads))
    nthreads = torch.get_num_threads()
    mod = load_kernels()
    if mod is not None:
        _tune_malloc()
    convs = [op for op in ops if op.kind in TUNABLE]
    layers: list[LayerChoice] = []
    for op in convs:
        macs, nz = _macs(op)
        ws = _weights(op)
        dens = sum(int((w != 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws))
        layers.append(LayerChoice(op.name, op.kind, list(ws[0].shape), float(dens), macs, nz, "dense"))
    if mod is None:
        compiled = CompiledModel(ops, nvals, output, None, specs[0][0], layers, nthreads, specs[0][1], inputs=specs,
                                 input_names=names)
        compiled._dynamic, compiled.fixed_batch = dyn, lowering.fixed_batch
        return compiled

    eligible = [_eligible(op) for op in convs]
    # candidate kernels per layer: "sparse" (eligible layers, not with sparse="never"), "dense" (ATen: oneDNN /
    # MKL), for linears and RNNs "direct" (netcarve's dense panel kernel) and, for groups=1 convs, "direct" (netcarve's dense
    # register-blocked conv; for depthwise convs its
    # depthwise kernel); "always": sparse only
    # (with "auto" only layers at most SPARSE_MAX_DENSITY dense are offered the sparse kernel)
    cands = []
    gen_ok, gen_why = (False, "")
    if codegen:
        from .codegen import host_supported

        gen_ok, gen_why = host_supported()
        if not gen_ok:
            logger.warning("runtime.compile(codegen=True): %s; compiling without generated code", gen_why)
    for op, ok, lc in zip(convs, eligible, layers):
        c = ["dense"] + (["direct"] if (op.kind == "conv" and (ok or _depthwise(op))) or op.kind in ("linear", "rnn")
                         else [])
        offer = ok and sparse == "auto" and lc.density <= SPARSE_MAX_DENSITY
        gen = ["generated"] if (gen_ok and ok and op.kind == "conv" and sparse != "never"
                                and (sparse == "always" or offer)) else []
        cands.append(["sparse"] + gen if sparse == "always" and ok else c + (["sparse"] if offer else []) + gen)
    if _choices:  # (a dynamic model's plan for other sizes: the layers keep the example plan's kernels, untimed)
        for i, op in enumerate(convs):
            if _choices.get(op.name) in cands[i]:
                cands[i] = [_choices[op.name]]
    if gen_ok:
        _build_generated(convs, cands)
    tuned = [len(c) > 1 for c in cands]
    known: list[dict | None] = [None] * len(convs)
    if any(tuned):
        cache = _TuneCache() if use_cache else None
        keys = [_signature(op, specs[0][0], nthreads) for op in convs]
        for i, t in enumerate(tuned):
            hit = cache.get(keys[i]) if cache and t else None
            if hit is not None and all(f"{k}_ms" in hit for k in cands[i]):
                known[i] = hit
        missing = [i for i, t in enumerate(tuned) if t and known[i] is None]
        if missing:
            times = {k: _profile_tunable(mod, ops, nvals, output, px, convs, k, repeats, cands)
                     for k in KERNEL_KINDS if any(k in cands[i] for i in missing)}
            for i in missing:
                entry = dict(cache.get(keys[i]) or {}) if cache else {}
                entry.update({f"{k}_ms": times[k][i] for k in cands[i]})
                known[i] = {**entry, "fresh": True}
                if cache:
                    cache.put(keys[i], entry)
            if cache:
                cache.save()
    for op, c, kn, lc in zip(convs, cands, known, layers):
        if kn is not None:
            # (only the candidates' times: a cache entry may hold others, from a run that offered more kernels)
            lc.sparse_ms, lc.dense_ms, lc.direct_ms, lc.generated_ms = (
                kn.get(f"{k}_ms") if k in c else None for k in ("sparse", "dense", "direct", "generated"))
            lc.cached = not kn.get("fresh", False)
            lc.choice = _pick(c, kn)
        else:
            lc.choice = c[0]
        _set_kernel(op, lc.choice)
    plan = build_native(mod, ops, nvals, output)
    check = None
    if sparse != "always" and any(tuned):
        plan, check = _check_whole_plan(mod, ops, nvals, output, px, convs, cands, known, layers, plan,
                                        max(3, repeats // 2))
    small = (plan, ops, {lc.name: lc.choice for lc in layers})
    if lanes != "never" and len(xs) == 1 and xs[0].dim() == 4 and (lanes == "always"
                                                                   or xs[0].shape[0] >= LANES_MIN_BATCH):
        ops, nvals, output, plan, check = _try_lanes(mod, ops, nvals, output, plan, xs[0], convs, layers,
                                                     check, lanes, max(3, repeats // 2))
    compiled = CompiledModel(ops, nvals, output, plan, specs[0][0], layers, nthreads, specs[0][1], inputs=specs,
                             input_names=names)
    compiled.plan_check = check
    if lanes == "auto" and plan is not small[0]:
        compiled._small, compiled.lanes_min_batch = small, LANES_MIN_BATCH
    compiled._dynamic, compiled.fixed_batch = dyn, lowering.fixed_batch
    return compiled


# derived forms of an op's weight that a plan for other input sizes may take over from the example plan's op
_SHARED_PAYLOADS = ("bsr", "taps", "packed", "panels")


def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
        a.dtype == b.dtype and torch.equal(a, b)


def _share_payloads(ops: list[Op], parent: list[Op]) -> None:
    """A dynamic model's plan for other input sizes: each op with the example plan's op of its name and kind and equal
    weights takes that op's weight, bias and packed forms (BSR tiles, conv taps, direct-conv packing) instead of its
    own copies, so that the plans share them and nothing is packed twice (a recurrent layer: its gate matrices,
    BSR tiles and dense panels)."""
    by_name = {op.name: op for op in parent}
    for op in ops:
        q = by_name.get(op.name)
        if q is not None and q.kind == op.kind == "rnn" and len(op.p["dense"]) == len(q.p["dense"]) and all(
                (a is None and b is None) or _same(a, b) for a, b in zip(op.p["dense"], q.p["dense"])):
            op.p["dense"] = q.p["dense"]  # (a recurrent layer's gate matrices and biases, and their packed forms)
            for k in ("bsr", "panels"):
                if k in q.p:
                    op.p[k] = q.p[k]
            continue
        if q is None or q.kind != op.kind or not _same(op.p.get("weight"), q.p.get("weight")):
            continue
        op.p["weight"] = q.p["weight"]
        if _same(op.p.get("bias"), q.p.get("bias")):
            op.p["bias"] = q.p["bias"]
        for k in _SHARED_PAYLOADS:
            if k in q.p:
                op.p[k] = q.p[k]


LANES_MODES = ("auto", "always", "never")
# the lanes plan must beat the plan without it by this factor to be kept (whole-plan times differ by a few percent
# between rounds)
LANES_MARGIN = 0.95


def _try_lanes(mod, ops, nvals, output, plan, x, convs, layers, check, mode: str, repeats: int):
    """The plan with runs of convs in the lanes layout (:func:`netcarve.runtime.lanes.lanes_rewrite`) where it is
    faster as a whole ("auto") or always ("always"). Offered: the convs on a sparse kernel and convs reading at most
    4 channels (a stem on the image, which would otherwise need a conversion of its larger output)."""
    names = {op.name for op, lc in zip(convs, layers) if op.kind == "conv" and lanes_conv_ok(op)
             and (lc.choice in SPARSE_KINDS or op.p["weight"].shape[1] <= 4)}
    if not names:
        return ops, nvals, output, plan, check
    ops2, nvals2, output2, count = lanes_rewrite(ops, nvals, output, names)
    if count == 0 or all(op.p["weight"].shape[1] <= 4 for op in convs if op.name in names):
        return ops, nvals, output, plan, check
    plan2 = build_native(mod, ops2, nvals2, output2)
    info = {"lanes_convs": count}
    keep = mode == "always"
    if not keep:
        best = _time_plans({"plan": plan, "lanes": plan2}, x, repeats)
        info.update(without_lanes_ms=round(best["plan"], 4), lanes_ms=round(best["lanes"], 4))
        keep = best["lanes"] < LANES_MARGIN * best["plan"]
    info["lanes_chosen"] = keep
    check = {**(check or {}), **info}
    if not keep:
        return ops, nvals, output, plan, check
    lanes_names = {op.name for op in ops2 if op.kind == "conv" and op.p["kernel"] == "lanes"}
    for lc in layers:
        if lc.name in lanes_names:
            lc.choice = "lanes"
    return ops2, nvals2, output2, plan2, check


# the per-layer choices are kept unless a uniform plan is faster than them by more than this (whole-plan times
# differ by a few percent between rounds)
PLAN_CHECK_MARGIN = 0.95


def _check_whole_plan(mod, ops, nvals, output, x, convs, cands, known, layers, tuned_plan, repeats: int):
    """Time the per-layer choices against uniform plans as whole plans, interleaved over 3 rounds, and keep the
    fastest. The uniform plans: every layer at its fastest dense kernel ("dense"); every eligible layer sparse
    ("sparse"); and the per-layer choices with every dense-chosen layer on one dense kernel family, ATen's
    ("tuned_aten") or netcarve's direct / panel kernel ("tuned_direct"). A per-layer profile taken while the machine
    was busy (or cached from such a moment) can pick kernels that lose as a whole (measured on a Zen 4 VM: a sparse
    ResNet-56 at batch 64 whose cached profile put 17 of its 18 8x8 layers on the dense kernel ran 49-58 ms,
    all-sparse 33-36 ms), and a plan that alternates netcarve's kernels with ATen's matmuls can lose to either
    (transformer_tiny at batch 16, 9 of 18 linears on the panel kernel: 0.84-0.90x the all-ATen plan). Returns
    (plan, {variant: ms, ..., "chosen": variant})."""
    def dense_of(c, kn):  # the layer's fastest dense candidate (its only candidate where it has no other)
        d = [k for k in c if k not in SPARSE_KINDS] or c
        return _pick(d, kn) if kn else d[0]

    tuned_choice = [lc.choice for lc in layers]
    variants = {"tuned": tuned_choice,
                "dense": [dense_of(c, kn) for c, kn in zip(cands, known)],
                "sparse": ["sparse" if "sparse" in c else dense_of(c, kn) for c, kn in zip(cands, known)]}
    for fam in ("dense", "direct"):  # (the ATen dense kernel is the candidate "dense")
        variants["tuned_aten" if fam == "dense" else "tuned_direct"] = [
            fam if ch not in SPARSE_KINDS and fam in c else ch for ch, c in zip(tuned_choice, cands)]
    plans = {"tuned": tuned_plan}
    for name in ("dense", "sparse", "tuned_aten", "tuned_direct"):
        if variants[name] != tuned_choice and variants[name] not in [variants[k] for k in plans]:
            for op, ch in zip(convs, variants[name]):
                _set_kernel(op, ch)
            plans[name] = build_native(mod, ops, nvals, output)
    best = _time_plans(plans, x, repeats) if len(plans) > 1 else {}
    chosen = "tuned"
    if best:
        fastest = min(best, key=best.get)
        if fastest != "tuned" and best[fastest] < PLAN_CHECK_MARGIN * best["tuned"]:
            chosen = fastest
    for op, lc, ch in zip(convs, layers, variants[chosen]):
        lc.choice = ch
        _set_kernel(op, ch)
    check = {**{k: round(v, 4) for k, v in best.items()}, "chosen": chosen}
    return plans[chosen], check


def _time_plans(plans: dict, x, repeats: int, rounds: int = 3) -> dict[str, float]:
    """Each plan's best time (ms) over ``rounds`` interleaved rounds of ``repeats`` calls (2 warm-up calls each)."""
    times: dict[str, list[float]] = {k: [] for k in plans}
    for _ in range(rounds):
        for k, p in plans.items():
            times[k].append(float(p.time(x, repeats, 2)))
    return {k: min(v) for k, v in times.items()}


# sparse="auto" offers the sparse kernel only to layers at most this dense. On the Zen 4 VM the tap-list kernel is
# load-bound and the dense kernels FMA-bound, and the host halves wide-FMA throughput for tens of seconds at a time
# (benchmarks/phase_probe.py): in those phases the sparse kernel beat the dense ones even on fully dense layers, and
# a profile taken then (and cached) kept a dense ResNet-56 on the sparse kernel at 4.26 ms against 2.06 ms dense.
# Measured there at 2 threads (ResNet-56, random weights, random zeros, the same two plans alternated 12 times):
# at density 0.7 the sparse plan ran 8-11% slower than the dense one at batch 1 in the unthrottled samples (1.4-1.9x
# faster in the throttled ones) and 28-31% slower at batch 64; at density 0.5 16-24% faster at batch 1.
SPARSE_MAX_DENSITY = 0.7


# the sparse kernel must beat the fastest dense candidate by this factor to be chosen: per-op profile times
# differ by a few percent between runs, and a near-dense layer run sparse was measured far slower in the plan
# than its profile said (dense ResNet-56 at batch 1 on a Zen 4 VM: 19 layers picked sparse by 2-7%, whole plan
# 1.7x slower than all-dense)
SPARSE_MARGIN = 0.9


# the timed kernel kinds, and those that skip zeros (held to SPARSE_MARGIN against the dense ones)
KERNEL_KINDS = ("dense", "direct", "sparse", "generated")
SPARSE_KINDS = ("sparse", "generated")


def _pick(cands: list[str], known: dict) -> str:
    """The fastest candidate, where a sparse kind ("sparse", "generated") counts only if it is faster than
    ``SPARSE_MARGIN`` x the fastest dense one (or no dense one is a candidate)."""
    dense = [k for k in cands if k not in SPARSE_KINDS]
    sparse = [k for k in cands if k in SPARSE_KINDS]
    best_sparse = min(sparse, key=lambda k: known[f"{k}_ms"]) if sparse else None
    if not dense:
        return best_sparse
    best = min(dense, key=lambda k: known[f"{k}_ms"])
    if best_sparse and known[f"{best_sparse}_ms"] < SPARSE_MARGIN * known[f"{best}_ms"]:
        return best_sparse
    return best


def _build_generated(convs: list[Op], cands: list[list[str]]) -> None:
    """Generate and compile (or find cached) the code of every conv offered "generated"; a layer whose build fails
    loses that candidate (with a warning), the others keep theirs."""
    from .codegen import build_conv

    for op, c in zip(convs, cands):
        if "generated" not in c or "gen" in op.p:
            continue
        try:
            op.p["gen"] = {"lib": str(build_conv(op.p["weight"], name=op.name))}
        except ConfigError as e:
            logger.warning("runtime.compile: no generated code for %s: %s", op.name, e)
            c.remove("generated")


def _set_kernel(op: Op, choice: str) -> None:
    """Point one tunable op at a kernel: "sparse", "dense" (ATen), "direct" or "generated" (convs only)."""
    if op.kind == "conv":
        op.p["kernel"] = "depthwise" if choice == "direct" and _depthwise(op) else {"dense": "aten"}.get(choice, choice)
    else:
        op.p["sparse"] = choice == "sparse"
        op.p["direct"] = choice == "direct" and op.kind in ("linear", "rnn")


def _profile_tunable(mod, ops, nvals, output, x, convs, choice: str, repeats: int,
                     cands: list[list[str]] | None = None) -> list[float]:
    """Per tunable op (``convs``): its median time in the whole plan profiled with every op that can take
    ``choice`` ("dense", "direct", "sparse" or "generated": the ops offered it in ``cands``) on it (the others
    dense)."""
    saved = [(op.p.get("kernel"), op.p.get("sparse"), op.p.get("direct")) for op in convs]
    for i, op in enumerate(convs):
        if choice == "direct":  # netcarve's dense conv / depthwise / linear panel kernel
            ok = (op.kind == "conv" and (_eligible(op) or _depthwise(op))) or op.kind in ("linear", "rnn")
        else:
            ok = _eligible(op)
        if choice == "generated":
            ok = ok and cands is not None and "generated" in cands[i]
        _set_kernel(op, choice if ok else "dense")
    try:
        plan = build_native(mod, ops, nvals, output)
        ms = plan.profile(x, repeats, max(3, repeats // 4))
    finally:
        for op, (k, sp, di) in zip(convs, saved):
            if op.kind == "conv":
                op.p["kernel"] = k
            else:
                op.p["sparse"], op.p["direct"] = sp, di
    by_op = dict(zip((id(op) for op in ops), ms))
    return [float(by_op[id(op)]) for op in convs]
