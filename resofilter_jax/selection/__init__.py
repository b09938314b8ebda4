"""Selection library behind ``python -m resofilter_jax.select``.

* :mod:`~resofilter_jax.selection.policies`: the Superfiltering and ResoFilter policies.
* :mod:`~resofilter_jax.selection.pipeline`: ``SelectConfig`` and ``run`` (score file -> rows).
* :mod:`~resofilter_jax.selection.rows`: score files, the scored data, output rows and names.
* :mod:`~resofilter_jax.selection.diversity`: Superfiltering.D (IFD stage + facility location),
  over :mod:`~resofilter_jax.selection.facility_location` and
  :mod:`~resofilter_jax.selection.embeddings` (these three import jax).
"""
