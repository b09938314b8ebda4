"""Helpers shared by the test modules (not tests: pytest collects no file here).

- ``support.data``: offline tokenizers, asset paths and file writers of the data tests.
- ``support.models``: the tiny random Hugging Face parity models (configs, reference outputs,
  the loaded NNX models) and tiny models saved as HF directories.
- ``support.scoring``: IFD and resonance scoring helpers (Alpaca rows, the tiny-model
  resonance runs and their float64-loop checks, packed rows, the resonance job's config).
- ``support.training``: the character tokenizer, tiny HF models and configs of the SFT tests.
- ``support.faults``: a small tmpfs mounted as an output directory (full-disk tests; root).
- ``support.fuzz``: the hypothesis generators of the reader and format fuzz tests, and the
  model of what each generated file must read back as.
- ``support.selection``: score files and data files of the select tests.
- ``support.gguf_writer``: GGUF files of the tiny parity models.

Test modules import helpers from here, never from each other.
"""
