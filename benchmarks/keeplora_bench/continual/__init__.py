"""The embedded real benchmark: data sources and task builders, the prompt classifier, and ``keeplora run``.

Layout: ``sources`` (pinned registry artifacts, cache), ``readers`` (raw formats), ``tasks`` (builders, splits,
JSONL cache), ``model`` (encoder, cosine label-prompt classifier), ``data`` (tokenized batches), ``methods``
(zero-shot, full fine-tuning, LoRA-FT, KeepLoRA/KeepLoRA+ and ablations), ``runner`` (``keeplora run``),
``sweep`` (``keeplora sweep``), ``metrics`` (Transfer / Average / Last), ``plots``.
"""
