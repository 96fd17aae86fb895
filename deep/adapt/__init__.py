"""Online unsupervised surgical adaptation: MEMO and TENT restricted to blocks.

    python -m deep adapt --benchmark fmnist-c --method memo,tent \
        --blocks none,first,first+second,last,all --out results.csv [--episodic] [--quick]

Library:
    METHODS: name -> AdaptMethod                            the one method table
    marginal_entropy(logits) -> (loss, avg_log_probs)     MEMO's loss
    adapted_parameter_names(model, method, option, blocks)  what a block option updates
    make_adapter(...), run_stream(...)                      adapt over a stream
    run_adaptation(protocol, out, ...)                      a whole protocol, resumable
See docs/online-adaptation.md and `core`'s docstring for what exactly is adapted.
"""

from __future__ import annotations

from .cli import HELP, add_arguments, run
from .core import (METHODS, AdaptMethod, Adapter, MemoAdapter, MemoConfig, TentAdapter,
                   TentConfig, adapted_parameter_names, make_adapter, marginal_entropy,
                   method_spec, parse_blocks, run_stream, softmax_entropy, stream_batches)
from .protocol import AdaptProtocol, load_adapt_protocol
from .results import is_adapt_results, read_adapt_results, write_adapt_report
from .runner import adapt_stream, run_adaptation, stream_order

__all__ = ["HELP", "METHODS", "AdaptMethod", "AdaptProtocol", "Adapter", "MemoAdapter",
           "MemoConfig", "TentAdapter", "TentConfig", "adapt_stream", "adapted_parameter_names",
           "add_arguments", "is_adapt_results", "load_adapt_protocol", "make_adapter",
           "marginal_entropy", "method_spec", "parse_blocks", "read_adapt_results", "run",
           "run_adaptation", "run_stream", "softmax_entropy", "stream_batches", "stream_order",
           "write_adapt_report"]
