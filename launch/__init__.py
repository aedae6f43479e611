"""The reference training job: ``python launch/train.py`` and ``mpirun -n 4 python launch/train.py``.

Nothing is imported here on purpose: importing :mod:`launch` must not import
TensorFlow or initialize MPI. Use the modules directly (``launch.tf_config``,
``launch.mpi``, ``launch.data``, ``launch.model``, ``launch.train``).
"""

__all__: list = []
