"""Analysis library behind ``python -m resofilter_jax.analyze``.

* :mod:`~resofilter_jax.analysis.pipeline`: ``AnalyzeConfig`` and ``run`` (the modes).
* :mod:`~resofilter_jax.analysis.report`: score files matched, compared, plotted, rendered.
* :mod:`~resofilter_jax.analysis.compare`: N methods pairwise (rank-correlation and top-k
  overlap matrices, heatmaps).
* :mod:`~resofilter_jax.analysis.rank_stats`: Spearman, Kendall tau-b, Pearson (scipy).
* :mod:`~resofilter_jax.analysis.gradient_cosine`: projected gradients vs a target set (jax).
"""
