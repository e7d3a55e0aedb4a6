"""Causal tracing (ROME, Meng et al. 2022a §2.1): which hidden states carry a recalled fact.

``python -m kaedit.trace model=NAME dataset=counterfact trace.n_records=N``

For each of N records (by default those the model gets right: the first token of the true
object is its top-1 next token after the filled-in rewrite prompt, as ROME's "known facts"):

1. **clean run** -- P(o), the probability of that token, and every state that can be
   restored: the residual stream (decoder block output h^l), the MLP output m^l and the
   attention output a^l, at every token;
2. **corrupted run** -- Gaussian noise N(0, ν²) added to the embeddings of the subject
   tokens, ν = ``noise`` × the standard deviation of the subject tokens' embeddings
   (ROME: 3σ); ``samples`` seeded noise draws per record; P*(o) is their mean;
3. **restored runs** -- the corrupted run with clean states put back at one token: one
   layer's residual stream, or the MLP / attention outputs of a window of ``window`` layers
   around the layer (ROME's window: layers l − ⌊w/2⌋ .. l + ⌈w/2⌉ − 1, clipped to the
   model). The indirect effect is IE = P*_restored(o) − P*(o).

The average indirect effect (AIE) averages IE over records and over the tokens of each
position class -- first / middle / last subject token, first subsequent token, further
tokens, last token (ROME's classes; a token can be in two, e.g. a one-token subject is both
its first and last token) -- per layer and state kind. Tokens before the subject are not
traced: the noise never reaches them, so restoring them changes nothing.

Batching: restoring a state at token t leaves tokens 0..t−1 as in the corrupted run, so all
restorations at token t share the corrupted run's key/value cache of those tokens and run
only tokens t..n−1; the rows of all restorations at t (kinds × layers × samples) go through
one forward pass when they fit in ``batch_size`` rows.

Outputs, in ``<run_dir>/trace/``: ``aie.csv`` (kind, layer, position, AIE, its standard
error, count of record-tokens, records), ``records.csv`` (per record: prompt, subject
tokens, P(o) clean and corrupted), ``restored.csv`` (per record, kind, layer and token: the
restored P(o)), ``heatmap_{residual,mlp,attn}.png`` (ROME's layers × positions maps),
``aie_by_layer.png`` (AIE at the last subject token), ``recommendation.json`` and the
trackers' files (``metrics.csv``: one row per layer; W&B offline run).

The recommendation is the layer L of maximum MLP AIE at the last subject token and the
edit window L−n+1..L ending there (the paper's L−4..L for n = 5; n defaults to the length
of the model's ``edit.layers``). A run uses it with ``method.layers=from_trace:RUN_DIR``
(:func:`kaedit.setup.resolve_from_trace`).

The package by concern: :mod:`~kaedit.trace.compute` (settings, prompts, the forward
passes, record selection), :mod:`~kaedit.trace.tables` (tables and the recommendation),
:mod:`~kaedit.trace.plots` (figures) and :mod:`~kaedit.trace.cli` (``run`` and the
Hydra entry point, ``python -m kaedit.trace``).
"""

from kaedit.setup import (
    FROM_TRACE,
    RECOMMENDATION,
    TRACE_DIR,
    edit_window,
    read_recommendation,
    resolve_from_trace,
)
from kaedit.trace.cli import TraceResult, main, run
from kaedit.trace.compute import (
    KINDS,
    POSITIONS,
    SELECT,
    Prompt,
    RecordTrace,
    Restoration,
    TraceSettings,
    clean_run,
    embedding_std,
    encode_prompt,
    next_token_probs,
    position_classes,
    record_generator,
    restored_probs,
    select_records,
    state_modules,
    subject_noise,
    trace_record,
    window_layers,
)
from kaedit.trace.plots import plot_aie_by_layer, plot_heatmap, write_figures
from kaedit.trace.tables import (
    RECOMMEND_KIND,
    RECOMMEND_POSITION,
    Recommendation,
    aie_grid,
    aie_table,
    recommend,
    records_table,
    restored_table,
)

__all__ = [
    "FROM_TRACE", "KINDS", "POSITIONS", "RECOMMENDATION", "RECOMMEND_KIND",
    "RECOMMEND_POSITION", "SELECT", "TRACE_DIR", "Prompt", "Recommendation", "RecordTrace",
    "Restoration", "TraceResult", "TraceSettings", "aie_grid", "aie_table", "clean_run",
    "edit_window", "embedding_std", "encode_prompt", "main", "next_token_probs",
    "plot_aie_by_layer", "plot_heatmap", "position_classes", "read_recommendation",
    "recommend", "record_generator", "records_table", "resolve_from_trace", "restored_probs",
    "restored_table", "run", "select_records", "state_modules", "subject_noise",
    "trace_record", "window_layers", "write_figures",
]
