"""Visual-semantic embedding (retrieval) fine-tuning of the pretrained towers, VSE++ style.

Modules, one job each::

    config.py     typed run configuration (dataclasses, key=value overrides)
    data.py       Karpathy-split JSON reader (clear errors) and caption datasets
    losses.py     VSE++ hinge (hardest negative or sum over negatives) and InfoNCE
    text_gru.py   the classic text baseline: own word vocabulary, embeddings, (bi)GRU over packed sequences
    model.py      image tower + text encoder, new heads, saved and loaded in the export format
    train.py      the loop under DeepSpeed: freezing, lr factors, per-epoch rsum, early stopping, best model

Inference users import ``model`` (``load_vse_export``) only; ``train`` is the trainer.
"""
