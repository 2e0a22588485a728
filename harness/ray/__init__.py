"""The Ray executor: every cell a Ray task (``harness run --executor ray``).

``executor`` plans and dispatches, ``tasks`` are the remote functions,
``cluster`` connects and sizes resources, ``factstore`` shares factorizations
through the results store.
"""
