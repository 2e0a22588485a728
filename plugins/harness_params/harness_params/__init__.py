"""Parameter and byte counts of the model as evaluated.

``params_kept`` / ``bytes_kept``: what the decomposable layers hold now
(factors count k(m+n); packed layers report their own exact bytes);
``kept_fraction``: params_kept over the same layers' dense parameters (the
suite's ``params`` target is stated in this unit); ``model_params`` /
``model_bytes``: the whole model, tied tensors counted once.
"""

from __future__ import annotations

import harness

__version__ = "0.1.0"


class Params(harness.Profiler):
    name = "params"
    description = "parameters and bytes kept"

    def profile(self, model, tokenizer, options, ctx):
        kept, kept_bytes = harness.count_layers(model, ctx.decomposable)
        total, total_bytes = harness.count_model(model)
        metrics = {
            "params_kept": kept,
            "bytes_kept": kept_bytes,
            "kept_fraction": kept / ctx.dense_params if ctx.dense_params else 1.0,
            "model_params": total,
            "model_bytes": total_bytes,
        }
        info = {"units": {"params_kept": "count", "bytes_kept": "bytes", "model_bytes": "bytes"}}
        return harness.EvalResult(metrics, info, {k: False for k in metrics})


@harness.hookimpl
def register_profilers(register):
    register(Params())
