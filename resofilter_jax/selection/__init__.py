"""Selection library behind ``python -m resofilter_jax.select``.

* :mod:`~resofilter_jax.selection.policies`: the Superfiltering and ResoFilter policies.
* :mod:`~resofilter_jax.selection.pipeline`: ``SelectConfig`` and ``run`` (score file -> rows).
* :mod:`~resofilter_jax.selection.score_file`: score files read column by column.
* :mod:`~resofilter_jax.selection.rows`: the scored data read back in one pass, output rows.
* :mod:`~resofilter_jax.selection.assemble`: output rows, made in the data file's order.
* :mod:`~resofilter_jax.selection.output`: output files written incrementally (JSON / JSONL).
* :mod:`~resofilter_jax.selection.settings`: output names, the scorer's recorded settings.
* :mod:`~resofilter_jax.selection.diversity`: Superfiltering.D (IFD stage + facility location),
  over :mod:`~resofilter_jax.selection.facility_location` and
  :mod:`~resofilter_jax.selection.embeddings` (these three import jax).
* :mod:`~resofilter_jax.selection.target`: target-aware selection (max cosine, RDS+'s
  round-robin) over blocks of vectors, used by :mod:`~resofilter_jax.selection.representation`
  (RDS+ embeddings, cached by :mod:`~resofilter_jax.selection.embedding_cache`) and
  :mod:`~resofilter_jax.selection.gradient` (LESS projected gradients); the latter two
  import jax.
"""
