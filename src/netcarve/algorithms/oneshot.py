"""``oneshot`` and ``iterative``: prune by the criterion, physically remove, recalibrate BatchNorm, fine-tune."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compact import keep_count, prune_channels, recalibrate_bn, remove_channels
from ..criteria import accumulate_gradients
from ..errors import CheckpointError, ConfigError
from ..train import fit
from ..utils import atomic_write
from .base import (
    AlgorithmResult,
    PruneJob,
    PruningAlgorithm,
    candidate_groups,
    count,
    geometric,
    groups_of,
    make_result,
    recovery_words,
    register_algorithm,
    remove_and_recover,
    rewind,
    score_groups,
    select_keep,
    working_copy,
)

logger = logging.getLogger(__name__)


def _finetune(job: PruneJob, model: nn.Module, teacher, kd, epochs: int, out_dir) -> list[dict[str, Any]]:
    if epochs < 1:
        return []
    cfg = job.train.replace(epochs=epochs)
    res = fit(model, job.train_loader, job.test_loader, cfg, out_dir=out_dir, teacher=teacher, kd=kd,
              resume=job.resume, progress=job.progress)
    model.zero_grad(set_to_none=True)
    model.eval()
    return res.history


@register_algorithm("oneshot")
class OneShot(PruningAlgorithm):
    """Score once, remove to the target in one go, recalibrate BatchNorm, then fine-tune for the whole
    ``train.epochs`` budget (logit KD from the unpruned model with ``distill``); no budget, no fine-tune."""

    summary = "prune once to the target, BN recalibration, optional (KD) fine-tune"

    def run(self, job: PruneJob) -> AlgorithmResult:
        original = job.model
        work = working_copy(original)
        if job.needs_gradients:
            rewind(job.train_loader)
            accumulate_gradients(work, job.train_loader, num_batches=job.gradient_batches)
        pr = prune_channels(work, job.example_input, **job.target_kwargs())
        if job.reconstruct_batches:  # refit against the unpruned model
            pruned = remove_and_recover(job, work, pr.groups, pr.keep)
        else:
            pruned = pr.model
            if job.bn_batches:
                rewind(job.train_loader)
                recalibrate_bn(pruned, job.train_loader, num_batches=job.bn_batches)
        pruned.zero_grad(set_to_none=True)
        teacher, kd = job.teacher_and_kd(original)
        out = Path(job.out_dir) / "finetune" if job.out_dir is not None else None
        history = [{"step": 1, "macs": pr.macs_after, "widths": {k: w[0] for k, w in pr.widths.items()}}]
        history += _finetune(job, pruned, teacher, kd, job.epochs, out)
        return make_result(job, self.name, original, pruned, pr.groups, pr.keep, pr.ratio, history)

    def describe(self, job: PruneJob) -> str:
        s = f"oneshot channel pruning ({job.criterion_name}, {job.describe_target()}, round_to {job.round_to})"
        s += recovery_words(job)
        if job.epochs:
            s += f" + {job.kd_kind() + ' KD' if job.teacher is not None or job.distill else 'plain'} fine-tune {job.epochs} epoch(s)"
        return s


STATE_FILE = "iterative.json"


@register_algorithm("iterative")
class Iterative(PruningAlgorithm):
    """Reach the target in ``steps`` prune -> remove -> BN recalibration -> short fine-tune rounds.

    The per-step targets are geometric: with a MACs target R, step i (1-based) prunes the current model to
    ``baseline_macs / R**(i/steps)``; with a ratio r, every group keeps ``n * (kept/n)**(i/steps)``
    channels (rounded to ``round_to``) where ``kept`` is what a one-shot prune to r keeps, so the final
    widths equal the one-shot widths. The epoch budget is split over the steps (earlier steps get the
    remainder); the teacher is the original unpruned model. Every step is committed to
    ``out_dir/iterative.json`` (+ ``step<i>/weights.safetensors``); fine-tunes checkpoint per epoch under
    ``out_dir/step<i>/``, so an interrupted run resumes inside the step it was in.
    """

    summary = "geometric schedule of prune + BN recalibration + KD fine-tune steps"
    options = {"steps": 3}

    def check(self, job: PruneJob) -> None:
        steps = self.opts["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"algorithm 'iterative': steps must be an integer >= 1, got {steps!r}")

    def _epochs(self, job: PruneJob) -> list[int]:
        n, e = self.opts["steps"], job.epochs
        return [e // n + (1 if i < e % n else 0) for i in range(n)]

    def run(self, job: PruneJob) -> AlgorithmResult:
        steps = int(self.opts["steps"])
        original = job.model
        groups0 = groups_of(job, original)
        cands = candidate_groups(groups0, job.protected)
        macs0, _ = count(original, job.example_input)
        final_counts = None
        # the one-shot widths are the end point of the width schedule (a MACs target with per-layer ratios
        # too: relative targets per step would apply the fixed ratios again at every step)
        by_widths = job.ratio is not None or bool(job.layer_ratios)
        if by_widths:
            work = working_copy(original)
            if job.needs_gradients:
                rewind(job.train_loader)
                accumulate_gradients(work, job.train_loader, num_batches=job.gradient_batches)
            pr0 = prune_channels(work, job.example_input, groups=groups0, **job.target_kwargs())
            final_counts = {k: w[0] for k, w in pr0.widths.items()}
            pr0_ratio = pr0.ratio
            del work, pr0
        teacher, kd = job.teacher_and_kd(original)
        out = Path(job.out_dir) if job.out_dir is not None else None
        what = {"ratio": job.ratio, "macs_reduction": job.macs_reduction, "criterion": job.criterion_name,
                "round_to": int(job.round_to), "protected": sorted(job.protected), "global_ranking": job.global_ranking,
                **({"layer_ratios": dict(job.layer_ratios)} if job.layer_ratios else {})}
        fresh = {"steps": [], "total": steps, "target": what}
        state = self._load_state(out, fresh) if (out is not None and job.resume) else fresh
        if out is not None and not job.resume:
            out.mkdir(parents=True, exist_ok=True)
            self._save_state(out, state)
        # cumulative kept indices in the original numbering
        keep: dict[str, torch.Tensor] = {g.name: torch.arange(g.num_channels) for g in cands}
        model = working_copy(original)
        history: list[dict[str, Any]] = []
        last_ratio = 0.0
        epochs = self._epochs(job)
        for i in range(1, steps + 1):
            done = state["steps"][i - 1] if i - 1 < len(state["steps"]) else None
            if done is not None and done.get("complete"):  # rebuild the committed step
                keep = {k: torch.tensor(v, dtype=torch.long) for k, v in done["keep"].items()}
                model = remove_channels(working_copy(original), groups0.groups, keep)
                self._load_weights(out / f"step{i}" / "weights.safetensors", model)
                history += done["history"]
                last_ratio = done["ratio"]
                continue
            groups = groups_of(job, model)
            by_name = {g.name: g for g in groups.groups}
            if not by_widths:
                target = macs0 / geometric(1.0, float(job.macs_reduction), i, steps)
                cur, _ = count(model, job.example_input)
                rel = max(1.0, cur / target) if i < steps else max(1.0, cur / (macs0 / float(job.macs_reduction)))
                if job.needs_gradients:
                    rewind(job.train_loader)
                    accumulate_gradients(model, job.train_loader, num_batches=job.gradient_batches)
                kw = job.target_kwargs() | {"ratio": None, "macs_reduction": rel}
                pr = prune_channels(model, job.example_input, groups=groups, **kw)
                step_keep, last_ratio = pr.keep, pr.ratio
            else:
                counts = {}
                for g in cands:
                    n, k_end = g.num_channels, final_counts[g.name]
                    want = n * (k_end / n) ** (i / steps) if i < steps else k_end
                    k = keep_count(n, 1.0 - want / n, int(job.round_to), int(job.min_channels), g.partitions)
                    counts[g.name] = min(max(k, k_end), len(keep[g.name]))  # monotone, never below the end
                scores = score_groups(job, model, [by_name[name] for name in counts])
                step_keep = select_keep(groups.groups, scores, counts)
                last_ratio = float(pr0_ratio)
            step_keep = {k: v for k, v in step_keep.items() if len(v) < by_name[k].num_channels}
            model = remove_and_recover(job, model, groups.groups, step_keep)
            model.zero_grad(set_to_none=True)
            keep = {k: (v[step_keep[k]] if k in step_keep else v) for k, v in keep.items()}
            macs, _ = count(model, job.example_input)
            rec = {"step": i, "macs": macs, "widths": {k: len(v) for k, v in keep.items()}}
            if not by_widths:
                rec["target_macs"] = int(target)
                if i < steps and macs < 0.9 * target:
                    logger.warning(
                        "iterative step %d of %d reached %.2fx fewer MACs, beyond its %.2fx step target: no width "
                        "in between (round_to=%d); the remaining steps only fine-tune", i, steps, macs0 / max(macs, 1),
                        macs0 / target, int(job.round_to))
            step_hist = [rec]
            sub = out / f"step{i}" if out is not None else None
            for r in _finetune(job, model, teacher, kd, epochs[i - 1], sub):
                step_hist.append({"step": i, **r})
            history += step_hist
            if out is not None:
                self._save_weights(sub / "weights.safetensors", model)
                state["steps"] = state["steps"][: i - 1] + [{"complete": True, "ratio": last_ratio, "history": step_hist,
                                                            "keep": {k: v.tolist() for k, v in keep.items()}}]
                self._save_state(out, state)
        return make_result(job, self.name, original, model, groups0, keep, last_ratio, history)

    # ----------------------------------------------------------------------- persistence
    @staticmethod
    def _save_state(out: Path, state: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / STATE_FILE, "w") as f:
            json.dump(state, f)

    @staticmethod
    def _load_state(out: Path, fresh: dict) -> dict:
        path = out / STATE_FILE
        if not path.is_file():
            return fresh
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable iterative-pruning state ({e}); delete it to start over") from None
        for key in ("total", "target"):
            if state.get(key) != fresh[key]:
                raise ConfigError(f"cannot resume from {path}: it was written for {key} {state.get(key)!r}, "
                                  f"not {fresh[key]!r} (start a fresh run without resume or use another out_dir)")
        return state

    @staticmethod
    def _save_weights(path: Path, model: nn.Module) -> None:
        from safetensors.torch import save

        from ..train.checkpoint import model_tensors

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(save(model_tensors(model)))

    @staticmethod
    def _load_weights(path: Path, model: nn.Module) -> None:
        from safetensors.torch import load

        try:
            model.load_state_dict(load(path.read_bytes()), strict=True)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot restore the iterative-pruning step ({e})") from None

    def describe(self, job: PruneJob) -> str:
        s = (f"iterative channel pruning ({job.criterion_name}, {job.describe_target()} in {self.opts['steps']} "
             f"geometric steps, round_to {job.round_to})")
        s += recovery_words(job)
        if job.epochs:
            s += f" + {job.kd_kind() + ' KD' if job.teacher is not None or job.distill else 'plain'} fine-tune {job.epochs} epoch(s) in total"
        return s


__all__ = ["Iterative", "OneShot"]
