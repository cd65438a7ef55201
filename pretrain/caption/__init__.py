"""Image captioning on top of the pretrained image tower (and, for conditioned generation, the text tower).

Modules, one job each::

    config.py     typed run configuration (dataclasses, key=value overrides)
    vocab.py      word-level vocabulary or the text tower's tokenizer
    data.py       Karpathy-split JSON -> caption units (image, references, optional condition)
    decoders.py   Show-Attend-Tell and AoA decoders (one step at a time)
    decoding.py   greedy, sampling, batched beam search
    losses.py     label-smoothed cross-entropy, scheduled sampling, doubly stochastic attention
    cider.py      fast CIDEr-D (the SCST reward; equals pycocoevalcap's "CIDEr")
    scst.py       self-critical sequence training (greedy or leave-one-out baseline)
    metrics.py    COCO caption metrics through pycocoevalcap (PTB tokenizer), with clear fallbacks
    model.py      encoder + decoder, saved and loaded as a model directory
    visualize.py  attention maps of every word over the photo
    train.py      the XE then SCST loop under DeepSpeed

Inference users import ``model``, ``decoding`` and ``visualize`` only; ``train`` is the trainer.
"""
