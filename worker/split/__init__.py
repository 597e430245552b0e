"""A worker as a small set of processes: one model process, N intake processes.

``worker.split.launch`` (the ``blipq-worker`` command) starts them; ``modelproc`` is the model
process (the models, the batcher, nothing else); ``remote`` is its client in an intake process
(a Celery worker); ``pixels`` moves tensors between them through shared memory.
"""
