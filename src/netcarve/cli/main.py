"""The ``netcarve`` command: thin argparse subcommands over the Python API (netcarve.flows)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from .._version import __version__
from ..errors import NetcarveError

# prune / sparsify --distill KIND: netcarve.train.KDConfig.RECOVERY_KINDS (kept here so that --help needs no torch;
# a test checks they agree)
DISTILL_KINDS = ["logit", "logit+feature", "logit_mse", "logit_mse+feature"]

# engines a command can time a model on (netcarve: the native runtime, autotuned per layer)
LATENCY_ENGINES = ["torch", "onnxruntime", "openvino", "netcarve"]


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _emit(a, obj, text) -> int:
    """Print ``obj`` as JSON with ``--json``, else ``text(obj)``."""
    if a.json:
        _print_json(obj)
    else:
        print(text(obj))
    return 0


def _command_line() -> str:
    return "netcarve " + " ".join(shlex.quote(x) for x in sys.argv[1:])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL|CHECKPOINT",
                   help="a registered model name (see `netcarve models`) or a checkpoint / run directory")
    p.add_argument("--weights", metavar="FILE",
                   help="weights to load: a pretrained file of shared/data as it is (.th, .npz), a .safetensors "
                        "or state-dict file, or 'pretrained' for the model's default pretrained file")
    p.add_argument("--data-dir", metavar="DIR",
                   help="data root (default: $NETCARVE_DATA, else a shared/data folder found above the cwd)")


def _cmd_models(a) -> int:
    from ..models import get_model_info, list_models

    rows = []
    for n in list_models():
        i = get_model_info(n)
        rows.append({"name": n, "family": i.family, "input_shape": list(i.input_shape), "dataset": i.dataset,
                     "pretrained": sorted(i.pretrained), "description": i.description})
    if a.json:
        _print_json(rows)
    else:
        for r in rows:
            pre = ",".join(r["pretrained"]) or "-"
            print(f"{r['name']:<18} {r['family']:<12} input {str(tuple(r['input_shape'])):<14} "
                  f"data {r['dataset']:<14} pretrained {pre}")
    return 0


def _cmd_eval(a) -> int:
    from ..flows.evaluate import evaluate_cli

    res = evaluate_cli(a.model, weights=a.weights, dataset=a.dataset, data_dir=a.data_dir,
                       batch_size=a.batch_size, split=a.split, limit=a.limit, threads=a.threads)
    return _emit(a, res, lambda r: f"{r['model']} on {r['dataset']} {r['split']} (n={r['n']}): "
                                   f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}")


def _cmd_profile(a) -> int:
    from ..flows.common import example_batch, resolve_model
    from ..measure import format_profile_table, profile_model

    model = resolve_model(a.model, a.weights, a.data_dir)
    prof = profile_model(model, example_batch(model, a.batch), engine=a.engine, threads=a.threads,
                         batch=a.batch, per_layer=not a.no_layers)
    return _emit(a, prof, format_profile_table)


def _cmd_bench(a) -> int:
    from ..flows.bench import bench_cli, format_bench

    return _emit(a, bench_cli(a), format_bench)


def _cmd_train(a) -> int:
    from ..flows.train import train_cli

    res = train_cli(a)
    return _emit(a, res, lambda r: f"trained {r['model']} for {r['epochs']} epochs: top-1 {r['top1']:.2f}% "
                                   f"(best {r['best_top1']:.2f}%); run directory {r['out']}")


def _cmd_demo(a) -> int:
    from ..flows.demo import DemoConfig, run_demo
    from ..report import format_table

    cfg = DemoConfig(dataset=a.dataset, model=a.model, data_dir=a.data_dir, out=a.out, engine=a.engine,
                     threads=a.threads, batch=a.batch, macs_reduction=a.macs_reduction,
                     finetune_epochs=a.finetune_epochs, train_subset=a.train_subset, seed=a.seed,
                     resume=a.resume, progress=not a.no_progress and not a.json)
    return _emit(a, run_demo(cfg, command=_command_line()), format_table)


def _cmd_prune(a) -> int:
    from ..flows.prune import prune_cli
    from ..report import format_table

    return _emit(a, prune_cli(a, command=_command_line()), format_table)


def _cmd_sparsify(a) -> int:
    from ..flows.sparsify import format_sparsify, sparsify_cli

    return _emit(a, sparsify_cli(a, command=_command_line()), format_sparsify)


def _cmd_run(a) -> int:
    from ..flows.sparsify import format_sparsify, run_cli

    return _emit(a, run_cli(a, command=_command_line()), format_sparsify)


def _add_precision_args(s) -> None:
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: train under bf16 autocast (fp32 weights and evaluation); ~2x faster on CPUs with "
                        "native bf16 (AVX512-BF16 / AMX)")
    s.add_argument("--channels-last", action="store_true", help="train convs in the channels-last memory format")
    _add_ema_arg(s)


def _add_ema_arg(s) -> None:
    s.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.998); validation and the "
                        "saved model use the average (TrainConfig.ema_decay; default 0 = off)")
    s.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mixup on every training batch, lam ~ Beta(ALPHA, ALPHA) (e.g. 0.2); with distillation the "
                        "teacher sees the same mixed images (TrainConfig.mixup; default 0 = off)")
    s.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="CutMix on every training batch (e.g. 1.0; with --mixup too: one of them per batch; "
                        "TrainConfig.cutmix; default 0 = off)")


def _add_run_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print report.json instead of the summary")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netcarve",
        description="Make PyTorch models smaller and measurably faster on the CPU they run on.",
    )
    p.add_argument("--version", action="version", version=f"netcarve {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("demo", help="train/load, compress, distill, measure and report on real data")
    s.add_argument("--dataset", default="digits", choices=["digits", "cifar10"],
                   help="digits: built-in UCI 8x8 digits (no download); cifar10: needs --data-dir or shared/data")
    s.add_argument("--model", help="model to compress (default: lenet for digits, resnet20 for cifar10)")
    s.add_argument("--data-dir", metavar="DIR")
    s.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    s.add_argument("--engine", choices=LATENCY_ENGINES,
                   help="latency engine (default: onnxruntime when installed, else torch)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--batch", type=int, help="batch size for latency (default: 64 for digits, 1 for cifar10)")
    s.add_argument("--macs-reduction", type=float, default=2.0)
    s.add_argument("--finetune-epochs", type=int, help="default: 20 (digits), 2 (cifar10)")
    s.add_argument("--train-subset", type=int, help="fine-tune on only N training images (default: all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (fine-tuning resumes from its last epoch)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print report.json instead of the table")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("models", help="list the registered models")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_models)

    s = sub.add_parser("eval", help="accuracy of a model or checkpoint on a data set")
    _add_model_args(s)
    s.add_argument("--dataset", help="data set (default: the model's own, e.g. cifar10)")
    s.add_argument("--split", default="test", choices=["train", "test"])
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--limit", type=int, help="evaluate only the first N samples")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--json", action="store_true", help='print {"top1", "top5", "loss", "n"} (percentages)')
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("profile", help="per-layer MACs (for the whole --batch), params and measured latency")
    _add_model_args(s)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--engine", default="torch", choices=LATENCY_ENGINES)
    s.add_argument("--no-layers", action="store_true", help="whole-model latency only")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_profile)

    s = sub.add_parser("bench", help="latency on every engine side by side (torch, onnxruntime, openvino, "
                                     "netcarve native dense / sparse, deepsparse) and netcarve per layer")
    _add_model_args(s)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--engines", nargs="+", metavar="ENGINE",
                   help="torch onnxruntime openvino netcarve-dense netcarve netcarve-gen deepsparse (default: all "
                        "available but netcarve-gen: netcarve with per-layer generated code offered too, built once "
                        "per layer and machine)")
    s.add_argument("--repeats", type=int, default=30)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--deepsparse-python", metavar="PYTHON",
                   help="interpreter of a virtualenv with deepsparse==1.8.0 (default: $NETCARVE_DEEPSPARSE_PYTHON)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("prune", help="structural channel pruning + BN recalibration + optional KD fine-tune")
    _add_model_args(s)
    s.add_argument("--out", required=True, help="run directory: compact model, baseline/, report")
    s.add_argument("--dataset", help="data set for evaluation, recalibration and fine-tuning (default: the model's)")
    s.add_argument("--scheme", default="channel",
                   help="'channel' (default: narrower layers) or 'depth' (remove whole residual blocks, keeping "
                        "their shortcuts: every remaining layer keeps its width, so latency falls with the MACs)")
    s.add_argument("--block-criterion", default="loss", choices=["loss", "cosine"],
                   help="--scheme depth: block importance = loss rise on 8 training batches when the block alone "
                        "is removed (default), or 1 - cos(block input, output)")
    s.add_argument("--criterion", default="l1", help="channel importance (see netcarve.criteria.list_criteria())")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--macs-reduction", type=float, help="target: baseline MACs / pruned MACs (e.g. 2.0)")
    g.add_argument("--ratio", type=float, help="fraction of channels removed in every prunable group")
    g.add_argument("--latency-ms", type=float, metavar="MS",
                   help="target: measured p50 latency in ms on --engine with --threads at --batch; the least "
                        "pruning meeting it is found by bisection, timing each candidate in fresh processes")
    s.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this (e.g. 8)")
    s.add_argument("--protect", action="append", default=[], metavar="MODULE_PATH",
                   help="never prune groups touching this module (path prefix; repeatable)")
    s.add_argument("--global-ranking", action="store_true", help="rank channels across groups (normalised scores)")
    s.add_argument("--hidden-size", action="store_true",
                   help="also prune a transformer's hidden size: embedding tables become producers and LayerNorm / "
                        "RMSNorm layers pass the channels (each then normalises over the kept ones)")
    s.add_argument("--layer-ratio", action="append", default=[], metavar="PATTERN=RATIO",
                   help="per-layer ratio: prune the groups produced by layers matching PATTERN (module path, "
                        "prefix or glob, e.g. layer1 or 'layer*.conv1') at RATIO; the target applies to the "
                        "rest; later patterns win (repeatable)")
    s.add_argument("--bn-batches", type=int, default=20, help="training batches for BN recalibration (default 20)")
    s.add_argument("--no-bn-recalibration", action="store_true")
    s.add_argument("--reconstruct", type=int, default=0, metavar="BATCHES",
                   help="after removal, refit every kept conv / linear weight by least squares so each layer "
                        "reproduces the unpruned model's output on BATCHES training batches (replaces BN "
                        "recalibration; channel pruning with any --algorithm; 0 = off)")
    s.add_argument("--finetune-epochs", type=int, default=0)
    s.add_argument("--distill", nargs="?", const="logit", default=None, choices=DISTILL_KINDS,
                   help="fine-tune with KD from the unpruned model: logit (softened KL, T=4, alpha=0.9; the default "
                        "when given alone), logit_mse (squared error on the logits, no label term), each +feature "
                        "(also the outputs of every block, via adapters fitted by least squares)")
    s.add_argument("--feature-weight", type=float, default=1.0,
                   help="weight of the block-feature loss with --distill logit+feature / logit_mse+feature")
    s.add_argument("--lr", type=float, default=0.005)
    _add_ema_arg(s)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--train-subset", type=int, help="fine-tune on only N training samples")
    s.add_argument("--test-subset", type=int, help="evaluate on a class-balanced N-sample subset of the test split")
    s.add_argument("--engine", choices=LATENCY_ENGINES,
                   help="latency engine (default: onnxruntime when installed, else torch)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--batch", type=int, default=1, help="batch size for latency (default 1)")
    s.add_argument("--latency-processes", type=int, default=3)
    s.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune in --out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print report.json instead of the table")
    a = s.add_argument_group(
        "pruning algorithm",
        "how the target is reached; every algorithm ends with physical channel removal + BN recalibration, and "
        "--finetune-epochs is its training budget: oneshot = prune once, then fine-tune; iterative = --steps "
        "rounds of prune + BN recalibration + KD fine-tune (epochs split over the steps); sfp = train, zeroing "
        "the lowest-scored channels after every epoch (they may recover), remove the last zeroed set; srfp/asrfp "
        "= like sfp but decaying them by --alpha (asrfp: alpha falls to 0 over 80% of the epochs); increg = "
        "rank-driven per-channel L2 penalties that grow until the channels to remove vanish")
    a.add_argument("--algorithm", default="oneshot", metavar="NAME",
                   help="oneshot (default), iterative, sfp, srfp, asrfp or increg (netcarve.algorithms)")
    a.add_argument("--steps", type=int, help="iterative: number of prune + fine-tune rounds (default 3)")
    a.add_argument("--prune-interval", type=int, metavar="N",
                   help="sfp/srfp/asrfp: prune every N epochs (default 1); increg: update penalties every N steps")
    a.add_argument("--alpha", type=float,
                   help="srfp: decay factor of the selected channels (default 0.3); asrfp: starting factor (default 1)")
    a.add_argument("--increg-mode", choices=["rank", "simple"],
                   help="increg: rank-driven increments (default) or growing penalties on channels picked once")
    a.add_argument("--increg-target-reg", type=float, metavar="LAMBDA",
                   help="increg: penalty at which a channel is zeroed (default 0.5 / lr)")
    a.add_argument("--increg-increment", type=float, metavar="A",
                   help="increg: largest penalty increment per update (default: reach the target in half the budget)")
    s.set_defaults(fn=_cmd_prune)

    s = sub.add_parser(
        "sparsify", help="fine-grained sparsity (unstructured, N:M, block, row/column, pattern, PCNN, ...) + "
                         "masked fine-tune; the model keeps its shapes, with zeros",
        description="Sparsify the weights of MODEL into one scheme (or a --plan of schemes per layer), reached by "
                    "--algorithm, recovered by masked fine-tuning (optionally distilled). RUN_DIR gets the dense "
                    "weights with zeros (model.safetensors + manifest.json), report.json/md and recipe.yaml "
                    "(replay it with `netcarve run RUN_DIR/recipe.yaml`).")
    _add_model_args(s)
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--dataset", help="data set (default: the model's own)")
    s.add_argument("--scheme", default="unstructured",
                   help="unstructured, nm, block, bsp, row, column, rowcol, connectivity, pattern, pcnn, channel_groups "
                        "(netcarve.sparsity.list_schemes())")
    s.add_argument("--sparsity", type=float, help="fraction of weights (or of the scheme's groups) zeroed, e.g. 0.9")
    s.add_argument("--n", type=int, help="nm: non-zeros per run of --m weights (e.g. 2)")
    s.add_argument("--m", type=int, help="nm: run length (e.g. 4)")
    s.add_argument("--block", help="block: tile ROWSxCOLS of the GEMM view (default 4x16)")
    s.add_argument("--balanced", action="store_true",
                   help="block: every row of tiles keeps the same number of tiles (RTMobile BSP; no dead rows)")
    s.add_argument("--patterns", type=int,
                   help="pattern: library size extracted from the model's 3x3 kernels (4/6/8/12; default 8); "
                        "pcnn: allowed position patterns per layer (default 16)")
    s.add_argument("--connectivity", type=float,
                   help="pattern: kernel reduction factor of connectivity pruning (3.6 keeps 1/3.6 of the kernels)")
    s.add_argument("--length", type=int, help="pcnn: vector length L (default 9: one 3x3 kernel)")
    s.add_argument("--keep", type=int, help="pcnn: non-zeros kept per vector")
    s.add_argument("--block-rows", type=int, help="bsp: rows per row block (default 16)")
    s.add_argument("--row-sparsity", type=float, help="bsp: fraction of whole rows zeroed after the column step")
    s.add_argument("--groups", type=int, help="channel_groups: number of channel groups")
    s.add_argument("--layers", nargs="+", metavar="GLOB", help="only these weights (globs on names / module paths)")
    s.add_argument("--types", nargs="+", metavar="TYPE", help="only these module types (Conv2d, Linear, LSTM, conv, rnn...)")
    s.add_argument("--exclude", nargs="+", metavar="GLOB", help="leave these weights dense")
    s.add_argument("--include-first-last", action="store_true",
                   help="also sparsify the first conv and the last linear layer (default: kept dense)")
    s.add_argument("--plan", metavar="FILE", help="a YAML/JSON sparsity plan (rules per layer / type) instead of --scheme")
    s.add_argument("--allocation", help="how the level is spread over the layers: uniform (default), global (one "
                                        "magnitude ranking), lamp (layer-adaptive, scale-invariant), erk (by layer "
                                        "shape); the total kept is the same")
    s.add_argument("--min-density", type=float,
                   help="non-uniform allocation: fraction of its groups every weight keeps at least (default 0)")
    s.add_argument("--algorithm", default="oneshot",
                   help="oneshot (default), agp, admm, reweighted, ssauto (netcarve.sparsity.list_sparsifiers())")
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="an algorithm option, e.g. rho=0.01, reg_epochs=3, frequency=100 (repeatable)")
    s.add_argument("--finetune-epochs", type=int, default=0, help="the whole training budget of the algorithm")
    s.add_argument("--distill", nargs="?", const="logit", default=None, choices=DISTILL_KINDS,
                   help="train with KD from the dense model: logit (softened KL, T=4, alpha=0.9; the default when "
                        "given alone), logit_mse (squared error on the logits, no label term), each +feature (also "
                        "the outputs of every block, via adapters fitted by least squares)")
    s.add_argument("--feature-weight", type=float, default=1.0,
                   help="weight of the block-feature loss with --distill logit+feature / logit_mse+feature")
    s.add_argument("--lr", type=float, default=0.01)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    s.add_argument("--grad-clip", type=float, help="max global gradient norm (recurrent models)")
    _add_precision_args(s)
    s.add_argument("--bn-batches", type=int, default=0, help="BN recalibration batches after the hard prune")
    s.add_argument("--train-subset", type=int, help="train on only N training samples")
    s.add_argument("--test-subset", type=int, help="evaluate on a class-balanced N-sample subset of the test split")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--latency", action="store_true",
                   help="also time baseline and sparse model in --engine (netcarve: the native runtime, sparse kernels "
                        "where faster; the others run the zeros dense)")
    s.add_argument("--engine", default="onnxruntime", choices=LATENCY_ENGINES)
    s.add_argument("--batch", type=int, default=1, help="batch size for --latency")
    _add_run_args(s)
    s.set_defaults(fn=_cmd_sparsify)

    s = sub.add_parser("run", help="run a YAML recipe (model, plan of schemes per layer, algorithm, budget, KD)")
    s.add_argument("recipe", metavar="RECIPE.yaml")
    s.add_argument("--out", help="override the recipe's run directory")
    _add_run_args(s)
    s.set_defaults(fn=_cmd_run)

    s = sub.add_parser("train", help="train or fine-tune (optionally with distillation), resumable")
    _add_model_args(s)
    s.add_argument("--dataset", help="data set (default: the model's own)")
    s.add_argument("--out", required=True, help="run directory (metrics.jsonl, train_state/, model)")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--weight-decay", type=float, default=5e-4)
    s.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    s.add_argument("--label-smoothing", type=float, default=0.0)
    _add_precision_args(s)
    s.add_argument("--subset", type=int, help="use only N training samples")
    s.add_argument("--no-augment", action="store_true")
    s.add_argument("--teacher", metavar="MODEL|CHECKPOINT", action="append", default=[],
                   help="distill from this teacher (a checkpoint, or a model name with --teacher-weights); "
                        "repeat for an ensemble teacher (the mean of the teachers' logits)")
    s.add_argument("--teacher-weights", metavar="FILE", action="append", default=[],
                   help="weights for --teacher (a file, or 'pretrained'); once for every teacher, or once per "
                        "--teacher in the same order")
    s.add_argument("--distill", default=None,
                   choices=["logit", "logit_mse", "feature", "logit+feature", "logit_mse+feature"],
                   help="distillation kind (default logit when --teacher is given; logit_mse: squared error on "
                        "the logits, the high-temperature limit of logit KD)")
    s.add_argument("--temperature", type=float, default=4.0)
    s.add_argument("--alpha", type=float, default=0.9)
    s.add_argument("--hint", action="append", default=[], metavar="STUDENT_LAYER:TEACHER_LAYER",
                   help="feature-KD layer pair (repeatable)")
    s.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature-KD (hint) loss")
    s.add_argument("--adapter-init", default="identity", choices=["identity", "lstsq"],
                   help="feature-KD adapters: PyTorch's init (the identity at equal widths), or fitted by least "
                        "squares from the student's to the teacher's features on the first batch")
    s.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return 2
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    try:
        return a.fn(a)
    except NetcarveError as e:
        print(f"netcarve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netcarve: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `netcarve models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
