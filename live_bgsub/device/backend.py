"""Backend helpers: a model's inference call compiled on the Keras backend, the upload of frames,
and whether the backend has an accelerator.

:func:`compiled_function` compiles a Keras model's call (``tf.function``, ``jax.jit`` or
``torch.compile``); :func:`upload_dtype` says in which dtype frames go to the device
(:data:`NATIVE_DTYPES` as they are, others as float32) and from which value a pixel is
invalid; :func:`aligned_zeros` makes the 64-byte aligned upload buffers that
:func:`tf_view` hands TensorFlow without a copy; :func:`accelerator_present` tells a GPU
from the CPU. Keras and the backend are imported by the calls, not by this module.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NATIVE_DTYPES", "accelerator_present", "aligned_zeros", "compiled_function", "tf_view", "upload_dtype"]

#: Frame dtypes uploaded as they are (cast to float32 on the device); others are cast on the host.
NATIVE_DTYPES = ("float32", "int16", "uint16", "int32")


def upload_dtype(dtype) -> tuple[np.dtype, float]:
    """(dtype the frames are uploaded in, sentinel: values >= it are invalid).

    Frames of :data:`NATIVE_DTYPES` go to the device as they are, others as float32; the
    sentinel is an integer dtype's maximum as float32 (a saturated or flagged pixel),
    infinity for floats.

    Examples
    --------
    >>> upload_dtype("uint16")
    (dtype('uint16'), 65535.0)
    >>> upload_dtype("float64")
    (dtype('float32'), inf)
    """
    dtype = np.dtype(dtype)
    sentinel = float(np.float32(np.iinfo(dtype).max)) if dtype.kind in "iu" else math.inf
    upload = dtype if dtype.name in NATIVE_DTYPES else np.dtype(np.float32)
    return upload, sentinel


def aligned_zeros(shape, dtype, align: int = 64) -> np.ndarray:
    """A zeroed C-contiguous array whose data starts on an ``align``-byte boundary.

    The device path's upload buffers: :func:`tf_view` hands an array aligned to 64 bytes
    to TensorFlow without a copy.

    Examples
    --------
    >>> buf = aligned_zeros((2, 3), "int32")
    >>> buf.ctypes.data % 64, buf.shape, buf.dtype
    (0, (2, 3), dtype('int32'))
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    offset = -raw.ctypes.data % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def compiled_function(model, jit: bool = True, *, to_numpy: bool = True):
    """``inputs -> tuple of numpy arrays``: ``model``'s inference call compiled on the Keras backend.

    With ``to_numpy=False`` the outputs stay the backend's tensors on the device (for
    timing a stage without its download, or chaining calls).

    What ``model.predict_on_batch`` runs, without its per-call machinery (~10 ms a call
    with TensorFlow here, measured: 1.2 ms per frame in batches of 8; a GPU would do
    the whole batch in less). One trace per input shape, like Keras':

    - TensorFlow: ``tf.function`` (XLA with ``jit``);
    - JAX: ``jax.jit`` of ``stateless_call`` with the variables' current values passed
      in, so that assigning a variable (a new run's constants) needs no new trace;
    - PyTorch: ``torch.compile`` with ``jit``, else the eager call; under ``no_grad``.

    ``model.traces`` (when the model has it) counts the traces or compilations: in the
    traced body (TensorFlow, JAX), in the ``torch.compile`` backend, or per call when
    eager.
    """
    import keras

    def count():
        if hasattr(model, "traces"):
            model.traces += 1

    def numpy(out):
        if not to_numpy:
            return tuple(keras.tree.flatten(out))
        return tuple(keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(out))

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def body(x):
            count()  # Python: runs once per trace
            return model(x, training=False)

        # reduce_retracing, as Keras' own predict function: from the second input shape on,
        # one shape-relaxed trace (XLA still compiles an executable per concrete shape
        # beneath it), and no retracing warnings from a long-running callback.
        fn = tf.function(body, jit_compile=bool(jit), autograph=False, reduce_retracing=True)
        # In and out without copies on the CPU: tf.function copies a numpy argument (an
        # EIGER2 9M pair: 40 ms), a DLPack view of an aligned one is free; EagerTensor.numpy()
        # shares the tensor's memory where np.array() (Keras' convert_to_numpy) copies.
        def call(x):
            out = tf.nest.flatten(fn(tf.nest.map_structure(tf_view, x)))
            return tuple(t.numpy() for t in out) if to_numpy else tuple(out)

        return call
    if backend == "jax":
        import jax

        def pure(trainable, non_trainable, x):
            count()  # Python: runs once per trace under jit, per call without
            return model.stateless_call(trainable, non_trainable, x)[0]

        fn = jax.jit(pure) if jit else pure

        return lambda x: numpy(
            fn([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables], x)
        )
    if backend == "torch" and jit:
        import torch
        from torch._inductor.compile_fx import compile_fx

        def counting_backend(graph, example_inputs):
            count()  # runs once per graph compiled
            return compile_fx(graph, example_inputs)

        forward = torch.compile(lambda x: model(x, training=False), backend=counting_backend)

        def call(x):
            with torch.no_grad():
                return numpy(forward(x))

        return call

    def eager(x):
        count()
        if backend == "torch":
            import torch

            with torch.no_grad():
                return numpy(model(x, training=False))
        return numpy(model(x, training=False))

    return eager


def tf_view(x):
    """A TensorFlow tensor viewing ``x`` without a copy (DLPack) where ``x`` is a writable,
    C-contiguous numpy array aligned to 64 bytes (TensorFlow's and XLA's alignment);
    anything else is returned as it is (``tf.function`` then converts it, with a copy).

    The tensor aliases ``x``: ``x`` must not change while a computation reads it (a
    synchronous call on the CPU, as :func:`compiled_function` makes, is over on return).
    """
    if not (isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable and x.ctypes.data % 64 == 0):
        return x
    import tensorflow as tf

    try:
        return tf.experimental.dlpack.from_dlpack(x.__dlpack__())
    except (BufferError, TypeError, ValueError, tf.errors.InvalidArgumentError):  # a dtype DLPack or TF lacks
        return x


def accelerator_present() -> bool:
    """Whether the Keras backend runs on an accelerator (a GPU), not the CPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    return False
