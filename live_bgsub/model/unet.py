"""The U-Net background model (pure Keras 3): a fold in, the background-corrected fold out.

The network predicts the background ``B`` of a normalised fold with a modified U-Net
(dilated 3x3 convolutions, LeakyReLU(0.2), max-pool down, upsampling + 3x3 conv up, as
in Aranguren Carmona, Agam & Irving, "Background subtraction in diffraction X-ray images
using deep CNN") and outputs ``input - B``. The contract (names, shapes) is
``docs/model.md``.
"""

from __future__ import annotations

import math

import keras

__all__ = ["UPSAMPLING", "BackgroundUNet", "build_unet", "unet_flops", "unet_traffic_bytes", "with_background"]

#: Interpolations accepted by ``keras.layers.UpSampling2D`` (the paper found nearest == bilinear).
UPSAMPLING = ("nearest", "bilinear", "bicubic", "lanczos3", "lanczos5")

_SLOPE = 0.2  # LeakyReLU negative slope (paper)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@keras.saving.register_keras_serializable(package="live_bgsub")
class BackgroundUNet(keras.Model):
    """Modified U-Net that subtracts its predicted background from the input fold.

    Parameters
    ----------
    depth : int, optional
        Number of encoder (and decoder) levels, each halving (doubling) the resolution
        (default 4). Input rows and columns must be multiples of ``2**depth``
        (:func:`live_bgsub.model.preprocessing.prepare` pads to them).
    base_filters : int, optional
        Filters of the first level; level ``l`` has ``base_filters * 2**l`` and the
        bottleneck ``base_filters * 2**depth`` (default 8).
    dilation_rate : int, optional
        Dilation of every 3x3 convolution (atrous convolutions, 2 or 4 in the paper;
        default 2).
    upsampling : str, optional
        Interpolation of the decoder's x2 upsampling (``keras.layers.UpSampling2D``),
        one of :data:`UPSAMPLING` (default ``"nearest"``).
    name : str, optional
        Model name (default ``"bgsub_unet"``).

    Notes
    -----
    Graph, channels-last, input ``(batch, rows, cols, 1)`` named ``"fold"``:

    - encoder level ``l`` (``l = 0 .. depth-1``): two ``[3x3 conv (dilated, same
      padding) + LeakyReLU(0.2)]`` with ``base_filters * 2**l`` filters (layers
      ``enc{l}_conv{1,2}``, ``enc{l}_act{1,2}``), kept as the skip, then a 2x2 max-pool
      (``enc{l}_pool``);
    - bottleneck: two such convolutions with ``base_filters * 2**depth`` filters;
    - decoder level ``l`` (``l = depth-1 .. 0``): x2 upsampling (``dec{l}_up``), a 3x3
      conv + LeakyReLU to ``base_filters * 2**l`` filters (``dec{l}_upconv``; no
      transposed convolution: checkerboard artifacts), concatenation with the skip
      (``dec{l}_concat``), two 3x3 convs + LeakyReLU;
    - a 1x1 convolution (linear) named ``"background"`` gives the predicted background
      ``B``; the output, named ``"corrected"``, is ``input - B``
      (``keras.layers.Subtract``). :func:`with_background` exposes both.

    Parameters: ``sum`` of ``9 c_in c_out + c_out`` over the 3x3 convolutions plus
    ``base_filters + 1`` for the 1x1 one: 540,073 for depth 4, ``base_filters=8``.
    Cost: about 8.2 GFLOP (2 x multiply-adds) per 512 x 512 fold at depth 4,
    ``base_filters=8``, growing as ``base_filters**2`` and with the pixel count
    (:func:`unet_flops`).

    ``get_config()`` lists the constructor arguments; ``model.save("x.keras")`` and
    ``keras.saving.load_model("x.keras", safe_mode=True)`` round-trip (the class is
    registered as ``live_bgsub>BackgroundUNet``).
    """

    def __init__(
        self,
        *,
        depth: int = 4,
        base_filters: int = 8,
        dilation_rate: int = 2,
        upsampling: str = "nearest",
        name: str = "bgsub_unet",
        **kwargs,
    ):
        _positive_int("depth", depth)
        _positive_int("base_filters", base_filters)
        _positive_int("dilation_rate", dilation_rate)
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")

        # === Layers and functional graph ===
        def conv(x, filters, label):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", dilation_rate=dilation_rate, name=f"{label}_conv"
            )(x)
            return keras.layers.LeakyReLU(negative_slope=_SLOPE, name=f"{label}_act")(x)

        inputs = keras.Input(shape=(None, None, 1), name="fold")
        x = inputs
        skips = []
        for level in range(depth):
            filters = base_filters * 2**level
            x = conv(x, filters, f"enc{level}_1")
            x = conv(x, filters, f"enc{level}_2")
            skips.append(x)
            x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
        x = conv(x, base_filters * 2**depth, "bottleneck_1")
        x = conv(x, base_filters * 2**depth, "bottleneck_2")
        for level in reversed(range(depth)):
            filters = base_filters * 2**level
            x = keras.layers.UpSampling2D(2, interpolation=upsampling, name=f"dec{level}_up")(x)
            x = conv(x, filters, f"dec{level}_up")
            x = keras.layers.Concatenate(axis=-1, name=f"dec{level}_concat")([skips[level], x])
            x = conv(x, filters, f"dec{level}_1")
            x = conv(x, filters, f"dec{level}_2")
        background = keras.layers.Conv2D(1, 1, name="background")(x)
        corrected = keras.layers.Subtract(name="corrected")([inputs, background])
        super().__init__(inputs=inputs, outputs=corrected, name=name, **kwargs)

        # === Config ===
        self.depth = depth
        self.base_filters = base_filters
        self.dilation_rate = dilation_rate
        self.upsampling = upsampling

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "depth": self.depth,
            "base_filters": self.base_filters,
            "dilation_rate": self.dilation_rate,
            "upsampling": self.upsampling,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_unet(
    *,
    depth: int = 4,
    base_filters: int = 8,
    dilation_rate: int = 2,
    upsampling: str = "nearest",
    name: str = "bgsub_unet",
) -> keras.Model:
    """Build the background-subtraction U-Net (a :class:`BackgroundUNet`).

    Parameters are those of :class:`BackgroundUNet`. Returns an uncompiled
    ``keras.Model`` with input ``(None, None, 1)`` and output ``input - B``.

    Examples
    --------
    >>> model = build_unet(depth=2, base_filters=4)
    >>> model.output.shape
    (None, None, None, 1)
    """
    return BackgroundUNet(
        depth=depth, base_filters=base_filters, dilation_rate=dilation_rate, upsampling=upsampling, name=name
    )


def with_background(model: keras.Model) -> keras.Model:
    """A model sharing ``model``'s weights that outputs ``(background, corrected)``.

    ``background`` is the output of the layer named ``"background"`` (the predicted
    ``B``), ``corrected`` the model's output (``input - B``); both in the model's
    normalised units.
    """
    return keras.Model(
        model.inputs, [model.get_layer("background").output, model.outputs[0]], name=f"{model.name}_with_background"
    )


def unet_flops(model: keras.Model, shape) -> int:
    """Floating-point operations of one forward pass: 2 x multiply-adds of the convolutions.

    Parameters
    ----------
    model : keras.Model
        A functional model (e.g. from :func:`build_unet`).
    shape : (int, int)
        ``(rows, cols)`` of one input fold (already padded to multiples of ``2**depth``).

    Returns
    -------
    int
        ``sum over Conv2D layers of 2 * out_rows * out_cols * kh * kw * c_in * c_out``
        (biases, activations, pooling and upsampling are not counted). About 8.2e9 for
        depth 4, ``base_filters=8`` at 512 x 512.
    """
    total = 0
    for layer, (_, out_rows, out_cols, _) in _conv_outputs(model, shape):
        kh, kw, c_in, c_out = layer.kernel.shape
        total += 2 * out_rows * out_cols * kh * kw * c_in * c_out
    return int(total)


def unet_traffic_bytes(model: keras.Model, shape, itemsize: int = 4) -> int:
    """Bytes one forward pass must move at least: the memory-bandwidth floor of the model.

    Parameters
    ----------
    model : keras.Model
        A functional model (e.g. from :func:`build_unet`).
    shape : (int, int)
        ``(rows, cols)`` of one input fold (padded as for :func:`unet_flops`).
    itemsize : int, optional
        Bytes per activation value (4 for float32, 2 for bfloat16/float16).

    Returns
    -------
    int
        ``itemsize * (input + 2 * sum over Conv2D layers of their output)`` plus the
        convolution weights: every convolution's output written once and read once,
        the activations, pooling, upsampling and concatenations assumed fused into their
        neighbours. Divided by a device's copy bandwidth it gives the time below which no
        implementation can run the model on that device (with ``unet_flops`` over its
        matmul rate, the arithmetic floor).
    """
    rows, cols = (int(v) for v in shape)
    total = rows * cols * model.inputs[0].shape[-1]
    weights = 0
    for layer, (_, out_rows, out_cols, c_out) in _conv_outputs(model, shape):
        total += 2 * out_rows * out_cols * c_out
        weights += math.prod(int(s) for s in layer.kernel.shape)
    return int(itemsize * (total + weights))


def _conv_outputs(model: keras.Model, shape):
    """``(layer, output shape)`` of every Conv2D for one ``(rows, cols)`` input fold."""
    rows, cols = (int(v) for v in shape)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    probe = keras.Model(model.inputs, [layer.output for layer in convs])
    channels = model.inputs[0].shape[-1]
    specs = probe.compute_output_spec(keras.KerasTensor((1, rows, cols, channels)))
    return [(layer, tuple(spec.shape)) for layer, spec in zip(convs, specs)]
