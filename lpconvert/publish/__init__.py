"""Publish: models in and out of lpconvert.

* :mod:`~lpconvert.publish.loading`, :mod:`~lpconvert.publish.weights`, :mod:`~lpconvert.publish.downloads` — any
  model spec loaded (timm, ``hf-hub:``, ``tv:``, local folders), weights files read safely, downloads failing fast
* :mod:`~lpconvert.publish.export` — a run's members collapsed and written with the run's numbers
* :mod:`~lpconvert.publish.model_folder`, :mod:`~lpconvert.publish.model_card` — the published folder (safetensors,
  config, card) and its card
* :mod:`~lpconvert.publish.hub` — ``lpconvert push``: the folder to the Hugging Face Hub
"""
