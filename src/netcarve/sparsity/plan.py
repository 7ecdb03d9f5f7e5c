"""Which weights get which scheme at which level: :class:`SparsityPlan`, a list of rules resolved against
a model into per-parameter :class:`Target` s.

Candidate weights (their GEMM view is what schemes see): ``Conv1d/2d/3d.weight``, ``Linear.weight``,
``LSTM/GRU/RNN.weight_ih_l*`` and ``weight_hh_l*`` (all gates stacked, every layer and direction),
``MultiheadAttention.in_proj_weight`` (or ``q/k/v_proj_weight``; its ``out_proj`` is a Linear).

A rule selects candidates by ``layers`` (globs on the parameter name ``"layer1.0.conv1.weight"`` or on the
module path ``"layer1.0.conv1"``) and/or ``types`` (module class names like ``Conv2d``, ``LSTM``, or the
aliases ``conv``, ``linear``, ``rnn``, ``attention``). Later rules override earlier ones for the same weight;
``exclude`` globs and ``skip_first_last`` (default: leave the first conv and the last linear layer dense,
the usual practice, card 0.3) remove weights. ``allocation`` spreads each rule's level over its weights
(:mod:`netcarve.sparsity.allocation`: ``uniform`` -- the default, the same level everywhere -- ``global``,
``lamp``, ``erk``: the rule's total kept, per-layer levels from a ranking of the weights' groups, each
keeping at least ``min_density`` of its groups), computed once from the weights the plan is resolved on. A rule whose scheme cannot apply to a matched weight (e.g.
``pattern`` on a 1x1 conv) skips it with the reason recorded in ``plan.resolve(model).skipped`` -- unless the
rule names that weight exactly (no glob characters), which is a ConfigError.

Plans round-trip through dicts (JSON/YAML)::

    {"rules": [{"scheme": "pattern", "options": {"library_size": 8}, "sparsity": 0.72, "types": ["Conv2d"]},
               {"scheme": "unstructured", "sparsity": 0.9, "layers": ["fc*"]}],
     "exclude": ["layer1.0.*"], "skip_first_last": true, "allocation": "lamp", "min_density": 0.02}
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import HeadPrunedMultiheadAttention
from .allocation import AllocEntry, allocate, get_allocation
from .schemes import SparsityScheme, check_level, make_scheme

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RNN = (nn.LSTM, nn.GRU, nn.RNN)
TYPE_ALIASES = {"conv": _CONV, "linear": (nn.Linear,), "rnn": _RNN, "attention": (nn.MultiheadAttention, HeadPrunedMultiheadAttention)}


def candidate_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(parameter name, module, attribute)`` of every weight a scheme may apply to, in module order."""
    out = []
    for path, mod in model.named_modules():
        pre = f"{path}." if path else ""
        if isinstance(mod, _CONV + (nn.Linear,)):
            out.append((pre + "weight", mod, "weight"))
        elif isinstance(mod, _RNN):
            for w in mod._flat_weights_names:
                if w.startswith("weight_"):
                    out.append((pre + w, mod, w))
        elif isinstance(mod, (nn.MultiheadAttention, HeadPrunedMultiheadAttention)):
            same = isinstance(mod, HeadPrunedMultiheadAttention) or mod._qkv_same_embed_dim
            names = ["in_proj_weight"] if same else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
            out += [(pre + n, mod, n) for n in names]
    return out


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


@dataclass
class SparsityRule:
    """One line of a plan: ``scheme`` (+ its ``options``) at ``sparsity`` on the selected weights."""

    scheme: str
    sparsity: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.layers, str):
            self.layers = [self.layers]
        if isinstance(self.types, str):
            self.types = [self.types]
        self.layers, self.types = list(self.layers), list(self.types)
        self.options = dict(self.options or {})

    def build(self) -> SparsityScheme:
        s = make_scheme(self.scheme, **self.options)
        lv = check_level(self.scheme, self.sparsity, required=s.uses_level and not _level_from_options(s))
        if not s.uses_level and lv is not None:
            raise ConfigError(f"scheme {self.scheme!r} fixes its own sparsity (by its options); drop 'sparsity'")
        return s

    def matches(self, name: str, mod: nn.Module) -> bool:
        path = name.rpartition(".")[0]
        ok_layer = not self.layers or any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(path, g)
                                          for g in self.layers)  # fmt: skip
        ok_type = not self.types or any(_type_match(t, mod) for t in self.types)
        return ok_layer and ok_type

    def names_exactly(self, name: str) -> bool:
        path = name.rpartition(".")[0]
        return any(not _has_glob(g) and g in (name, path) for g in self.layers)


def _level_from_options(s: SparsityScheme) -> bool:
    """Schemes that take their level from an option (pattern's ``connectivity``) may omit ``sparsity``."""
    return s.name == "pattern"


def _type_match(t: str, mod: nn.Module) -> bool:
    key = t.lower()
    if key in TYPE_ALIASES:
        return isinstance(mod, TYPE_ALIASES[key])
    return type(mod).__name__ == t


@dataclass
class Target:
    """One weight to sparsify: its name, scheme and level (None: the scheme's structure fixes it)."""

    name: str
    scheme: SparsityScheme
    level: float | None
    rule: int

    def to_dict(self) -> dict:
        return {"name": self.name, "scheme": self.scheme.name, "options": self.scheme.options(),
                "level": self.level, "rule": self.rule}


@dataclass
class Resolved:
    targets: list[Target]
    skipped: dict[str, str]  # weight name -> why it stays dense

    def by_name(self) -> dict[str, Target]:
        return {t.name: t for t in self.targets}


@dataclass
class SparsityPlan:
    rules: list[SparsityRule] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    skip_first_last: bool = True
    allocation: str = "uniform"
    min_density: float = 0.0

    def __post_init__(self):
        self.rules = [r if isinstance(r, SparsityRule) else SparsityRule(**_rule_kwargs(r)) for r in self.rules]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]

    @classmethod
    def single(cls, scheme: str, sparsity: float | None = None, **options) -> SparsityPlan:
        """One scheme on every weight it applies to (first conv / last linear dense)."""
        return cls(rules=[SparsityRule(scheme=scheme, sparsity=sparsity, options=options)])

    def validate(self) -> SparsityPlan:
        if not self.rules:
            raise ConfigError("a sparsity plan needs at least one rule (scheme + sparsity)")
        for i, r in enumerate(self.rules):
            try:
                r.build()
            except ConfigError as e:
                raise ConfigError(f"plan rule {i} ({r.scheme}): {e}") from None
            for t in r.types:
                if t.lower() not in TYPE_ALIASES and not t[:1].isupper():
                    raise ConfigError(f"plan rule {i}: type {t!r} is neither a module class name (e.g. Conv2d) nor "
                                      f"one of {', '.join(TYPE_ALIASES)}")
        if not isinstance(self.allocation, str):
            raise ConfigError(f"sparsity plan: allocation must be a name, got {self.allocation!r}")
        try:
            get_allocation(self.allocation)
        except ConfigError as e:
            raise ConfigError(f"sparsity plan: {e}") from None
        md = self.min_density
        if isinstance(md, bool) or not isinstance(md, (int, float)) or not 0.0 <= float(md) <= 1.0:
            raise ConfigError(f"sparsity plan: min_density must be a number in [0, 1], got {md!r}")
        return self

    def to_dict(self) -> dict:
        return {"rules": [asdict(r) for r in self.rules], "exclude": list(self.exclude),
                "skip_first_last": self.skip_first_last, "allocation": self.allocation,
                "min_density": float(self.min_density)}

    @classmethod
    def from_dict(cls, d: dict) -> SparsityPlan:
        if not isinstance(d, dict):
            raise ConfigError(f"a sparsity plan must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"rules", "exclude", "skip_first_last", "allocation", "min_density"})
        if unknown:
            raise ConfigError(f"sparsity plan: unknown field(s) {', '.join(unknown)}; known: rules, exclude, "
                              "skip_first_last, allocation, min_density")
        rules = d.get("rules") or []
        if not isinstance(rules, list):
            raise ConfigError("sparsity plan: 'rules' must be a list")
        return cls(rules=rules, exclude=list(d.get("exclude") or []),
                   skip_first_last=bool(d.get("skip_first_last", True)),
                   allocation=d.get("allocation", "uniform"), min_density=d.get("min_density", 0.0)).validate()

    def resolve(self, model: nn.Module) -> Resolved:
        """The per-weight targets of this plan on ``model`` and the weights left dense (with the reason)."""
        self.validate()
        cands = candidate_weights(model)
        built = [r.build() for r in self.rules]
        first_last = set()
        if self.skip_first_last:
            convs = [n for n, m, _ in cands if isinstance(m, _CONV)]
            lins = [n for n, m, _ in cands if isinstance(m, nn.Linear)]
            first_last = {*convs[:1], *lins[-1:]}
        targets, skipped = [], {}
        for name, mod, attr in cands:
            w = getattr(mod, attr)
            chosen = None
            for i in reversed(range(len(self.rules))):
                if self.rules[i].matches(name, mod):
                    chosen = i
                    break
            if chosen is None:
                continue
            rule, scheme = self.rules[chosen], built[chosen]
            exact = rule.names_exactly(name)
            if any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name.rpartition(".")[0], g)
                   for g in self.exclude):  # fmt: skip
                skipped[name] = "excluded by the plan"
                continue
            if name in first_last and not exact:
                skipped[name] = "first conv / last linear layer (kept dense; skip_first_last)"
                continue
            why = scheme.check(w)
            if why:
                if exact:
                    raise ConfigError(f"plan rule {chosen}: scheme {rule.scheme!r} cannot apply to {name} "
                                      f"(shape {tuple(w.shape)}): {why}")
                skipped[name] = f"{rule.scheme}: {why}"
                continue
            level = rule.sparsity if rule.sparsity is not None else scheme.default_level()
            targets.append(Target(name=name, scheme=scheme, level=None if level is None else float(level),
                                  rule=chosen))
        for i, r in enumerate(self.rules):
            for g in r.layers:
                if not _has_glob(g) and not any(n == g or n.rpartition(".")[0] == g for n, _, _ in cands):
                    raise ConfigError(f"plan rule {i}: no weight {g!r} in {type(model).__name__}; weights: "
                                      + ", ".join(n for n, _, _ in cands[:12]) + (" ..." if len(cands) > 12 else ""))
        if not targets:
            raise ConfigError(f"the sparsity plan selects no weight of {type(model).__name__}"
                              + (f" (skipped: {dict(list(skipped.items())[:4])})" if skipped else ""))
        if self.allocation != "uniform":
            self._allocate(targets, {n: getattr(m, a) for n, m, a in cands})
        return Resolved(targets=targets, skipped=skipped)

    def _allocate(self, targets: list[Target], weights: dict) -> None:
        """Replace the levels of each rule's targets by the plan's allocation of the rule's level."""
        for i, rule in enumerate(self.rules):
            mine = [t for t in targets if t.rule == i and t.level is not None]
            if not mine:
                continue
            entries = []
            for t in mine:
                w = weights[t.name].detach()
                ge = t.scheme.group_energy(w)
                if ge is None:
                    raise ConfigError(f"plan rule {i}: allocation {self.allocation!r} needs one number of kept groups "
                                      f"per weight, which scheme {rule.scheme!r} {t.scheme.options()} does not have; "
                                      "use allocation 'uniform' for this rule")
                entries.append(AllocEntry(name=t.name, shape=tuple(w.shape), energy=ge[0].cpu(), size=ge[1].cpu()))
            bad = next((e.name for e in entries if not bool(torch.isfinite(e.energy).all())), None)
            if bad is not None:
                raise ConfigError(f"plan rule {i}: weight {bad} has NaN / inf entries; cannot rank it "
                                  f"for allocation {self.allocation!r}")
            for t, lv in zip(mine, allocate(self.allocation, entries, mine[0].level, float(self.min_density))):
                t.level = float(lv)


def _rule_kwargs(r: Any) -> dict:
    if not isinstance(r, dict):
        raise ConfigError(f"a plan rule must be a mapping, got {r!r}")
    known = {"scheme", "sparsity", "options", "layers", "types"}
    unknown = sorted(set(r) - known)
    if unknown:
        raise ConfigError(f"plan rule {r}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "scheme" not in r:
        raise ConfigError(f"plan rule {r}: missing 'scheme'")
    return dict(r)
