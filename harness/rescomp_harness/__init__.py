"""rescomp-harness: evaluation and comparison for rescomp-modifiers.

The plugin (``rescomp_modifiers``) quantizes; this package measures: the embedded
default model and corpora (:mod:`.assets`), calibration/evaluation splits (:mod:`.data`),
perplexity and lm-eval tasks (:mod:`.evaluation`), ``rescomp compare`` (:mod:`.compare`,
:mod:`.cli`) and vLLM serving in its own environment (:mod:`.serving`). It imports the
plugin; the plugin never imports it.
"""
