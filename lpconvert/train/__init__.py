"""Train: Algorithm 1 over a converted model, as ``lpconvert finetune`` runs it.

* :mod:`~lpconvert.train.finetune` — the command, as functions that read top to bottom: ``run`` → ``start`` /
  ``resume`` → ``fit`` → ``finish``
* :mod:`~lpconvert.train.job` — everything checked before a run writes anything (``prepare``)
* :mod:`~lpconvert.train.loop` — one epoch of Algorithm 1, SWA's samples, the averaged model's validation
* :mod:`~lpconvert.train.engine` — Algorithm 1's two steps: member k's update, the shared weights' step
* :mod:`~lpconvert.train.optim_settings`, :mod:`~lpconvert.train.optim` — U_θ, U_φ, γθ, the schedule and SWA
* :mod:`~lpconvert.train.switch` — the T0 switch: one member becomes K (Eq. 2)
* :mod:`~lpconvert.train.state` — what a run's checkpoint holds (``RunCheckpoint``, ``TrainState``)
* :mod:`~lpconvert.train.stopping`, :mod:`~lpconvert.train.runtime`, :mod:`~lpconvert.train.distributed` — how a
  run stops; its device and threads; what the ranks of a torchrun run do together
* :mod:`~lpconvert.train.tensorboard`, :mod:`~lpconvert.train.plots` — its logs and curves
"""
