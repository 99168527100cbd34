"""Convert-on-load cache: any supported adapter directory -> a stock PEFT LoRA vLLM can load.

One module per job: ``keys`` (an entry's layout and its content key), ``trust`` (which entries
are used as they are, and reading them), ``build`` (:func:`~.build.prepare_adapter`: converting
on a miss, atomically), ``bound`` (the lock and the least-recently-used size bound),
``temporaries`` (what killed conversions left) and ``faults`` (a read-only or full disk is the
server's fault, not the adapter's). No vLLM import here.
"""
