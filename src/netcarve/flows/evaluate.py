"""``netcarve eval``: accuracy of a model or checkpoint on a data set."""

from __future__ import annotations

from .common import loaders_for, model_info, resolve_model


def evaluate_cli(spec: str, *, weights=None, dataset=None, data_dir=None, batch_size=256, split="test",
                 limit=None, threads=2) -> dict:
    from ..train import evaluate

    model = resolve_model(spec, weights, data_dir)
    info = model_info(model)
    ds = dataset or info.dataset
    train_loader, test_loader = loaders_for(model, ds, batch_size, data_dir=data_dir, augment=False)
    loader = test_loader if split == "test" else train_loader
    if limit:
        loader = _Limited(loader, limit)
    res = evaluate(model, loader)
    return {"model": info.name, "checkpoint_or_model": spec, "dataset": ds, "split": split, **res}


class _Limited:
    """The first ``limit`` samples of a loader (the last batch cut to size)."""

    def __init__(self, loader, limit: int):
        self.loader, self.limit = loader, limit

    def __iter__(self):
        seen = 0
        for x, y in self.loader:
            if seen >= self.limit:
                return
            take = min(len(y), self.limit - seen)
            seen += take
            yield x[:take], y[:take]

    def __len__(self):
        return len(self.loader)
