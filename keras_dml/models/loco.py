"""LoCo: train an encoder stage by stage with local contrastive losses on overlapping units.

The encoder is a list of stages applied in sequence. A *unit* is `overlap + 1`
consecutive stages with its own decoder and contrastive loss; unit `k` spans
stages `k .. k + overlap`, so consecutive units share `overlap` stages and a
shared stage gets gradients from two losses (LoCo's "gradient bridge"). The
input of every unit is stop-gradient'ed, so no gradient crosses a unit
boundary, and the train step back-propagates one unit at a time: only one
unit's activations are alive at once, which is where a memory saving can
come from (when the activations are spread over the stages).

With 4 stages, `overlap=1` gives units (0, 1), (1, 2), (2, 3) (LoCo);
`overlap=0` gives (0,), (1,), (2,), (3,) (Greedy InfoMax, one isolated stage
per loss, as compared in the LoCo paper); `end_to_end=True` gives one unit
(0, 1, 2, 3) without stop-gradients (SimCLR).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dml._checks import check_labels_dtype, labels_vector
from keras_dml.data.augment import SimCLRAugmentation
from keras_dml.losses.ntxent import nt_xent_loss
from keras_dml.losses.supcon import supcon_loss
from keras_dml.models.base import BackboneModel

DECODER_BLOCKS = ("downsample", "resnet", "none")


@keras.saving.register_keras_serializable(package="keras_dml")
class LoCoDecoder(keras.layers.Layer):
    """Project a stage's output to the embedding on which a local contrastive loss is taken.

    On a spatial input (rank 3 for sequences, rank 4 for images) it first runs
    a block that halves the resolution, then global average pooling; on a
    `(batch, features)` input it skips both. Then a 2-layer MLP (ReLU hidden
    layer, linear output) gives the projection: SimCLR's projection head. The
    extra block lets an early stage be judged by features one stage deeper
    than its own, which is what LoCo adds over Greedy InfoMax's linear
    decoders. `block` chooses it:

    - `"downsample"` (default): a 3x3 stride-2 convolution with batch
      normalisation and ReLU, then a residual unit at half resolution (3x3
      convolution, batch normalisation, identity shortcut). Only the strided
      convolution reads the stage's output, so the backward pass creates one
      full-resolution gradient, as the next stage of the encoder would.
    - `"resnet"`: the first block of a ResNet stage (two 3x3 convolutions,
      the first strided, and a strided 1x1 projection shortcut). Both
      branches read the stage's output, so back-propagation holds two
      full-resolution gradients and their sum at once: on early,
      high-resolution stages this costs more memory than the whole network
      trained end to end (`benchmarks/bench_loco.py` measures it).
    - `"none"`: no block, pooling and the MLP only (the cheapest).

    Args:
        projection_dim: size of the projection the loss sees. Defaults to 128.
        hidden_dim: size of the MLP's hidden layer; `None` uses the size of
            the pooled features.
        filters: channels of the block; `None` keeps the input's channels.
            The block's activations add to its unit's peak memory, so it is
            kept narrow rather than doubling channels like a ResNet stage
            would.
        block: `"downsample"`, `"resnet"` or `"none"`, as above. Defaults to
            `"downsample"`.
        **kwargs: `keras.layers.Layer` arguments (`name`, ...).

    Example:

    >>> import numpy as np
    >>> from keras_dml.models.loco import LoCoDecoder
    >>> tuple(LoCoDecoder(projection_dim=16)(np.zeros((2, 8, 8, 32), "float32")).shape)
    (2, 16)

    Reference:
        Xiong, Ren & Urtasun, "LoCo: Local Contrastive Representation
        Learning", NeurIPS 2020 (Section 3.2, decoder depth).
    """

    def __init__(
        self,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        filters: int | None = None,
        block: str = "downsample",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for arg, value in (("projection_dim", projection_dim), ("hidden_dim", hidden_dim),
                           ("filters", filters)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{arg}` must be a positive integer, got {value!r}.")
        if block not in DECODER_BLOCKS:
            raise ValueError(f"`block` must be one of {DECODER_BLOCKS}, got {block!r}.")
        self.projection_dim = projection_dim
        self.hidden_dim = hidden_dim
        self.filters = filters
        self.block = block
        self.data_format = keras.config.image_data_format()

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        if rank not in (2, 3, 4):
            raise ValueError(
                "LoCoDecoder takes (batch, features), (batch, steps, channels) or "
                f"(batch, height, width, channels) inputs, got shape {input_shape}."
            )
        self.spatial = rank > 2
        if self.spatial and self.block == "none":
            channel_axis = -1 if self.data_format == "channels_last" else 1
            pool = (keras.layers.GlobalAveragePooling2D if rank == 4
                    else keras.layers.GlobalAveragePooling1D)
            self.pool = pool(name="pool")
            features = input_shape[channel_axis]
        elif self.spatial:
            channel_axis = -1 if self.data_format == "channels_last" else 1
            filters = self.filters or input_shape[channel_axis]
            conv = keras.layers.Conv2D if rank == 4 else keras.layers.Conv1D
            pool = (keras.layers.GlobalAveragePooling2D if rank == 4
                    else keras.layers.GlobalAveragePooling1D)
            self.conv_1 = conv(filters, 3, strides=2, padding="same", use_bias=False,
                               name="conv_1")
            self.norm_1 = keras.layers.BatchNormalization(axis=channel_axis, name="norm_1")
            self.conv_2 = conv(filters, 3, padding="same", use_bias=False, name="conv_2")
            self.norm_2 = keras.layers.BatchNormalization(axis=channel_axis, name="norm_2")
            self.pool = pool(name="pool")
            self.conv_1.build(input_shape)
            block_shape = self.conv_1.compute_output_shape(input_shape)
            self.norm_1.build(block_shape)
            self.conv_2.build(block_shape)
            self.norm_2.build(block_shape)
            if self.block == "resnet":
                self.shortcut = conv(filters, 1, strides=2, use_bias=False, name="shortcut")
                self.shortcut_norm = keras.layers.BatchNormalization(
                    axis=channel_axis, name="shortcut_norm"
                )
                self.shortcut.build(input_shape)
                self.shortcut_norm.build(block_shape)
            features = filters
        else:
            features = input_shape[-1]
        hidden_dim = self.hidden_dim or features
        self.hidden = keras.layers.Dense(hidden_dim, activation="relu", name="hidden")
        self.projection = keras.layers.Dense(self.projection_dim, name="projection")
        self.hidden.build((input_shape[0], features))
        self.projection.build((input_shape[0], hidden_dim))

    def call(self, inputs, training=None):
        x = inputs
        if self.spatial and self.block == "none":
            x = self.pool(x)
        elif self.spatial:
            # Only conv_1 (and, for "resnet", the shortcut) reads the stage's output.
            y = ops.relu(self.norm_1(self.conv_1(x), training=training))
            z = self.norm_2(self.conv_2(y), training=training)
            if self.block == "resnet":
                shortcut = self.shortcut_norm(self.shortcut(x), training=training)
            else:
                shortcut = y
            x = self.pool(ops.relu(z + shortcut))
        return self.projection(self.hidden(x))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.projection_dim)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "projection_dim": self.projection_dim,
                "hidden_dim": self.hidden_dim,
                "filters": self.filters,
                "block": self.block,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        # Saved before `block` existed: that decoder was the ResNet block.
        return cls(**{"block": "resnet", **config})


@keras.saving.register_keras_serializable(package="keras_dml")
class LoCo(BackboneModel):
    """Train a list of encoder stages self-supervised, each unit of stages with its own loss.

    Every training batch `x` is augmented twice (`augment`), and the two
    views run through the stages as one batch. Unit `k` spans stages
    `k .. k + overlap`; its input (the output of stage `k - 1`) is
    stop-gradient'ed, and its last stage feeds its own `LoCoDecoder`, whose
    projections of the two views give the unit's NT-Xent loss at
    `temperature`, or, when `fit` gets labels `y`, its SupCon loss (labels as
    positives, scaled to match NT-Xent). So each stage is trained by the
    losses of the units that contain it: two with `overlap=1` (LoCo), one
    with `overlap=0` (Greedy InfoMax). `end_to_end=True` instead trains all
    stages through one decoder after the last stage (SimCLR), for
    comparison on the same stages.

    The train step takes one unit at a time: forward from the previous
    unit's stop-gradient'ed output, back-propagate, keep only the gradients
    (summed over units for a shared stage) and the output the next unit
    starts from. `fit` runs each unit's forward and backward pass as its own
    graph call from Python, so one unit's activations are alive at a time
    instead of the whole network's (under `run_eagerly` ops run in order
    anyway, and under `tf.distribute` the step is one graph whose units are
    ordered by control dependencies). All gradients are applied in one
    optimizer step at the end: no unit reads a variable that an earlier unit
    finished within the same step, so applying unit by unit would give the
    same update but advance the optimizer's step count (Adam's bias
    correction, learning-rate schedules) once per unit. The price is
    compute: a stage shared by two units runs forward twice per step (so its
    batch-normalisation moving statistics are updated twice).

    How much memory this saves depends on how evenly the stages split the
    activations and on what every unit adds (decoder, the `(2N, 2N)`
    similarity matrices of its loss); every method back-propagates through
    the first stage, so when the first stage dominates (a wide
    full-resolution first stage) nothing is saved. `benchmarks/bench_loco.py`
    measures it, and BENCHMARKS.md records it.

    `fit` logs `loss` (the sum of the unit losses) and `unit_<k>_loss` for
    each unit; `evaluate` gives the same on augmented views, with layers in
    inference mode. Sample weights are not supported. `model(x)` and
    `predict` return the last stage's output, and `embedding_model()` (alias
    `encoder()`) the stages alone as a plain Keras model, to embed, export or
    fit a linear probe.

    Backends: `fit` and `evaluate` need the TensorFlow backend (the train
    step uses one `tf.GradientTape` per unit with control dependencies that
    order the units; JAX's stateless train step would need a different
    implementation). Building, `predict`, `embedding_model()` and saving work
    on every backend. Under XLA (`jit_compile=True`, the default on GPU) the
    compiler schedules the ops itself.

    Args:
        stages: list of Keras layers or models applied in sequence; the
            output of one is the input of the next. The decoder of a unit
            adapts to the shape of its last stage's output.
        overlap: number of stages consecutive units share; a unit spans
            `overlap + 1` stages. 1 is LoCo, 0 is Greedy InfoMax. Must be
            below `len(stages)`. Defaults to 1.
        end_to_end: train all stages with one loss after the last stage and
            no stop-gradient (SimCLR); `overlap` is then ignored. Defaults to
            `False`.
        temperature: softmax temperature `tau > 0` of every unit's loss.
            Defaults to `0.1`.
        augment: layer (or callable) mapping an image batch to a random view
            of it, called twice per batch with `training=True`; `None` uses
            `SimCLRAugmentation()`. Must be a Keras layer for saving.
        projection_dim: size of each decoder's projection. Defaults to 128.
        hidden_dim: hidden size of each decoder's MLP; `None` uses the size
            of the decoder's pooled features.
        decoder_filters: channels of each decoder's residual block; `None`
            keeps the channels of the stage output it reads.
        decoder_block: each decoder's block on spatial stage outputs,
            `"downsample"` (default), `"resnet"` or `"none"`: see
            `LoCoDecoder`. `"resnet"` is the ResNet stage-entry block whose
            projection shortcut doubles the full-resolution gradients of
            the stage it reads; models saved before this option existed
            load with it.
        **kwargs: `keras.Model` arguments (`name`, ...).

    Example:

    >>> import keras, numpy as np
    >>> from keras_dml.models.loco import LoCo
    >>> stages = [
    ...     keras.Sequential([keras.layers.Conv2D(8, 3, padding="same", activation="relu")]),
    ...     keras.Sequential([keras.layers.Conv2D(16, 3, strides=2, activation="relu")]),
    ...     keras.Sequential([keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
    ...                       keras.layers.GlobalAveragePooling2D()]),
    ... ]
    >>> model = LoCo(stages, overlap=1, projection_dim=16)
    >>> model.compile(optimizer="adam")
    >>> x = np.random.default_rng(0).random((64, 8, 8, 1)).astype("float32")
    >>> history = model.fit(x, batch_size=32, epochs=1, verbose=0)
    >>> sorted(history.history)
    ['loss', 'unit_0_loss', 'unit_1_loss']
    >>> model.embedding_model().predict(x, verbose=0).shape
    (64, 32)

    Reference:
        Xiong, Ren & Urtasun, "LoCo: Local Contrastive Representation
        Learning", NeurIPS 2020. Greedy InfoMax: Löwe, O'Connor & Veeling,
        "Putting An End to End-to-End", NeurIPS 2019.
    """

    def __init__(
        self,
        stages,
        overlap: int = 1,
        end_to_end: bool = False,
        temperature: float = 0.1,
        augment=None,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        decoder_filters: int | None = None,
        decoder_block: str = "downsample",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if decoder_block not in DECODER_BLOCKS:
            raise ValueError(
                f"`decoder_block` must be one of {DECODER_BLOCKS}, got {decoder_block!r}."
            )
        if isinstance(stages, keras.layers.Layer) or not stages:
            raise ValueError("`stages` must be a non-empty list of Keras layers or models.")
        stages = list(stages)
        for i, stage in enumerate(stages):
            if not isinstance(stage, keras.layers.Layer):
                raise ValueError(f"`stages[{i}]` must be a Keras layer or model, got {stage!r}.")
        if isinstance(overlap, bool) or not isinstance(overlap, int):
            raise ValueError(f"`overlap` must be an integer, got {overlap!r}.")
        if not end_to_end and not 0 <= overlap < len(stages):
            raise ValueError(
                f"`overlap` must be in [0, {len(stages) - 1}] for {len(stages)} stages (a unit "
                f"spans overlap + 1 stages), got {overlap}."
            )
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
        if augment is not None and not callable(augment):
            raise ValueError(f"`augment` must be a layer or callable, got {augment!r}.")
        self.stages = stages
        self.overlap = overlap
        self.end_to_end = bool(end_to_end)
        self.temperature = float(temperature)
        self.augment = SimCLRAugmentation() if augment is None else augment
        self.projection_dim = projection_dim
        self.hidden_dim = hidden_dim
        self.decoder_filters = decoder_filters
        self.decoder_block = decoder_block

        width = len(stages) if self.end_to_end else overlap + 1
        self._unit_stages = tuple(
            tuple(range(first, first + width)) for first in range(len(stages) - width + 1)
        )
        self.decoders = [
            LoCoDecoder(projection_dim, hidden_dim, decoder_filters, decoder_block,
                        name=f"decoder_{k}")
            for k in range(len(self._unit_stages))
        ]
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.unit_loss_trackers = (
            [keras.metrics.Mean(name=f"unit_{k}_loss") for k in range(len(self._unit_stages))]
            if len(self._unit_stages) > 1
            else []
        )

    @property
    def unit_stages(self) -> tuple[tuple[int, ...], ...]:
        """The stage indices of each unit, e.g. `((0, 1), (1, 2), (2, 3))` for LoCo on 4 stages."""
        return self._unit_stages

    @property
    def metrics(self):
        return [self.loss_tracker, *self.unit_loss_trackers]

    def build(self, input_shape):
        x = keras.KerasTensor(tuple(input_shape))
        stage_shapes = []
        for stage in self.stages:
            # A symbolic call builds any kind of layer and gives its output shape.
            x = stage(x)
            stage_shapes.append(tuple(x.shape))
        for decoder, unit in zip(self.decoders, self._unit_stages, strict=True):
            if not decoder.built:
                decoder.build(stage_shapes[unit[-1]])
        self._record_input_shape(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        for stage in self.stages:
            x = stage(x, training=training)
        return x

    _embedding_model_suffix = "encoder"
    _build_hint = "fit it or call it on a batch"

    def embedding_model(self, pooling: str | None = None) -> keras.Model:
        """The trained stages (shared, not copied) as a functional Keras model, without decoders.

        Args:
            pooling: `None` returns the last stage's output as it is;
                `"avg"` or `"max"` adds global pooling when it is spatial.

        Returns:
            A `keras.Model` from the training inputs to the representation.
        """
        if pooling not in (None, "avg", "max"):
            raise ValueError(f"`pooling` must be None, 'avg' or 'max', got {pooling!r}.")
        return self._functional_embedding_model(
            lambda inputs: self._embedding_outputs(inputs, pooling)
        )

    def encoder(self, pooling: str | None = None) -> keras.Model:
        """Alias of `embedding_model(pooling)`, the name every model class shares."""
        return self.embedding_model(pooling)

    def _embedding_outputs(self, inputs, pooling=None):
        x = inputs
        for stage in self.stages:
            x = stage(x)
        if pooling is not None and len(x.shape) in (3, 4):
            rank = len(x.shape)
            pool = {
                ("avg", 3): keras.layers.GlobalAveragePooling1D,
                ("avg", 4): keras.layers.GlobalAveragePooling2D,
                ("max", 3): keras.layers.GlobalMaxPooling1D,
                ("max", 4): keras.layers.GlobalMaxPooling2D,
            }[(pooling, rank)]
            x = pool()(x)
        return x

    # -- local losses -----------------------------------------------------------

    def _views(self, x):
        """Two augmented views of `x`, stacked along the batch axis: rows i and i + N pair up."""
        x = ops.convert_to_tensor(x)
        if isinstance(self.augment, keras.layers.Layer):
            views = [self.augment(x, training=True), self.augment(x, training=True)]
        else:
            views = [self.augment(x), self.augment(x)]
        return ops.concatenate(views, axis=0)

    @staticmethod
    def _labels(y):
        if y is None:
            return None
        # LoCo's own steps take `y` from the user, never cast by Keras: float labels
        # are refused (see `keras_dml._checks`).
        check_labels_dtype(y, "y", whole_floats=False)
        labels = ops.cast(labels_vector(y, "y"), "int32")
        return ops.concatenate([labels, labels], axis=0)

    def _contrastive_loss(self, projections, labels):
        if labels is None:
            view_1, view_2 = ops.split(projections, 2, axis=0)
            return nt_xent_loss(view_1, view_2, temperature=self.temperature)
        # base_temperature = temperature: SupCon with instance labels is then exactly NT-Xent,
        # so supervised and self-supervised unit losses are on the same scale.
        return supcon_loss(
            labels, projections, temperature=self.temperature, base_temperature=self.temperature
        )

    def _unit_regularization(self, k):
        """Regularisation losses of the layers whose weights unit `k` is the last to train."""
        last_unit = len(self._unit_stages) - 1
        # A stage shared by two units must count its penalty once: the later unit owns it.
        owned = [s for s in self._unit_stages[k] if min(s, last_unit) == k]
        losses = [loss for s in owned for loss in self.stages[s].losses]
        losses += self.decoders[k].losses
        return sum((ops.cast(ops.sum(loss), "float32") for loss in losses), ops.zeros(()))

    def _unit_forward(self, k, inputs, labels, training):
        """Runs unit `k` from its stop-gradient'ed input; returns `(loss, first stage output)`.

        The first stage's output is what unit `k + 1` starts from.
        """
        x = ops.stop_gradient(inputs)
        handoff = None
        for s in self._unit_stages[k]:
            x = self.stages[s](x, training=training)
            if handoff is None:
                handoff = x
        loss = self._contrastive_loss(self.decoders[k](x, training=training), labels)
        return ops.add(ops.cast(loss, "float32"), self._unit_regularization(k)), handoff

    def compute_unit_losses(self, x, y=None, training: bool = False) -> list:
        """Every unit's local loss on two fresh augmented views of `x`, as a list of scalars.

        The same stop-gradient'ed forward passes as the train step, in one
        pass: under a gradient tape, unit `k`'s loss only has gradients for
        the stages of unit `k` and its decoder.

        Args:
            x: a batch of inputs.
            y: optional integer labels, for SupCon instead of NT-Xent.
            training: whether layers run in training mode (batch statistics,
                moving-average updates).
        """
        inputs, labels = self._views(x), self._labels(y)
        losses = []
        for k in range(len(self._unit_stages)):
            loss, inputs = self._unit_forward(k, inputs, labels, training)
            losses.append(loss)
        return losses

    # -- training -----------------------------------------------------------------

    def make_train_function(self, force=False):
        _require_tensorflow("fit")
        import tensorflow as tf

        if self.train_function is not None and not force:
            return self.train_function
        if self.run_eagerly or tf.distribute.has_strategy():
            # Eagerly every op runs (and frees) in order anyway; under tf.distribute the
            # step runs as one graph per replica, ordered by control dependencies.
            return super().make_train_function(force=force)
        self.train_function = self._make_unit_wise_train_function()
        return self.train_function

    def _make_unit_wise_train_function(self):
        """A train function that runs each unit's forward and backward as its own graph call.

        Inside one graph, TensorFlow's executor may start the next unit's forward
        pass before the previous unit's backward pass has freed its activations
        (the control dependency on the handoff orders only what it guards), and
        the step's peak then exceeds end-to-end training's. Separate calls,
        driven from Python, are a hard boundary: when a unit's call returns,
        only its handoff, its loss and its gradients are alive.
        """
        import tensorflow as tf

        def compile_function(fn):
            return tf.function(fn, reduce_retracing=True, jit_compile=self.jit_compile)

        views = compile_function(lambda x, y: (self._views(x), self._labels(y)))
        def unit_step_function(k):
            # Traced with an unknown batch size: with a static one, Grappler folds the
            # batch-sized constants (the loss's (2N, 2N) masks) into each unit's graph,
            # and every unit's graph keeps its own copy alive between steps.
            traced = {}

            def unit_step(inputs, labels):
                key = (labels is None, tuple(inputs.shape[1:]), inputs.dtype)
                if key not in traced:
                    spec = [tf.TensorSpec((None, *inputs.shape[1:]), inputs.dtype)]
                    if labels is None:
                        fn = lambda x: self._unit_gradients(k, x, None)  # noqa: E731
                    else:
                        spec.append(tf.TensorSpec((None,), labels.dtype))
                        fn = lambda x, y: self._unit_gradients(k, x, y)  # noqa: E731
                    traced[key] = tf.function(fn, input_signature=spec,
                                              jit_compile=self.jit_compile)
                return traced[key](inputs) if labels is None else traced[key](inputs, labels)

            return unit_step

        unit_steps = [unit_step_function(k) for k in range(len(self._unit_stages))]
        # Variables cannot be arguments of a tf.function: each apply step captures its own.
        apply_steps = {}

        def apply(variables, gradients, unit_losses):
            key = tuple(id(v) for v in variables)
            if key not in apply_steps:
                apply_steps[key] = compile_function(
                    lambda grads, losses: self._apply_and_track(grads, variables, losses)
                )
            return apply_steps[key](gradients, unit_losses)

        def one_step(data):
            x, y = self._start_train_step(data)
            inputs, labels = views(x, y)
            gradients = {}
            unit_losses = []
            for k, unit_step in enumerate(unit_steps):
                variables = self._unit_trainable_variables(k)
                loss, handoff, unit_gradients = unit_step(inputs, labels)
                _accumulate(gradients, variables, unit_gradients)
                unit_losses.append(loss)
                inputs = handoff
            del inputs
            pairs = list(gradients.values())
            return apply([v for v, _ in pairs], [g for _, g in pairs], unit_losses)

        def function(iterator):
            logs = None
            if isinstance(iterator, tf.data.Iterator):
                for _ in range(self.steps_per_execution):
                    optional = iterator.get_next_as_optional()
                    if not optional.has_value():
                        break
                    logs = one_step(optional.get_value())
            else:
                for _, data in zip(range(self.steps_per_execution), iterator, strict=False):
                    logs = one_step(data)
            if logs is None:
                raise StopIteration
            return logs

        return function

    def _unit_gradients(self, k, inputs, labels):
        """Unit `k`'s loss, the output unit `k + 1` starts from, and its gradients."""
        import tensorflow as tf

        variables = self._unit_trainable_variables(k)
        with tf.GradientTape() as tape:
            loss, handoff = self._unit_forward(k, inputs, labels, training=True)
            scaled_loss = self.optimizer.scale_loss(loss)
        return loss, handoff, tape.gradient(scaled_loss, variables)

    def _apply_and_track(self, gradients, variables, unit_losses):
        if gradients:
            self.optimizer.apply_gradients(list(zip(gradients, variables, strict=True)))
        return self._update_trackers(unit_losses)

    def make_test_function(self, force=False):
        _require_tensorflow("evaluate")
        return super().make_test_function(force=force)

    def train_step(self, data):
        import tensorflow as tf

        x, y = self._start_train_step(data)
        inputs, labels = self._views(x), self._labels(y)
        gradients = {}  # id(variable) -> (variable, gradient summed over the units)
        unit_losses = []
        for k in range(len(self._unit_stages)):
            loss, handoff, unit_gradients = self._unit_gradients(k, inputs, labels)
            _accumulate(gradients, self._unit_trainable_variables(k), unit_gradients)
            unit_losses.append(loss)
            if k + 1 < len(self._unit_stages):
                # Start the next unit only after this unit's backward pass, so that the
                # executor cannot interleave the two and keep both units' activations alive.
                done = [g for g in unit_gradients if g is not None]
                with tf.control_dependencies(done):
                    inputs = tf.identity(handoff)
        if gradients:
            self.optimizer.apply_gradients([(g, v) for v, g in gradients.values()])
        return self._update_trackers(unit_losses)

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        self._build_for_step(x)
        return self._update_trackers(self.compute_unit_losses(x, y, training=False))

    def _start_train_step(self, data):
        """`(x, y)` of a training batch, with the model and its optimizer built."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError("LoCo does not support `sample_weight`.")
        self._build_for_step(x)
        if not self.optimizer.built:
            # Built lazily, `apply_gradients` would know only the variables of this first step.
            self.optimizer.build(self.trainable_variables)
        return x, y

    def _build_for_step(self, x):
        # On TensorFlow, `fit` builds a model when its train step first calls it; this one
        # calls its stages directly, so it builds itself (all stages and decoders) here.
        if not self.built:
            self.build(tuple(ops.convert_to_tensor(x).shape))

    def _unit_trainable_variables(self, k):
        layers = [self.stages[s] for s in self._unit_stages[k]] + [self.decoders[k]]
        variables, seen = [], set()
        for layer in layers:
            for variable in layer.trainable_variables:
                if id(variable) not in seen:  # a layer may be reused in two stages
                    seen.add(id(variable))
                    variables.append(variable)
        return variables

    def _update_trackers(self, unit_losses):
        self.loss_tracker.update_state(ops.sum(ops.stack(unit_losses)))
        for tracker, loss in zip(self.unit_loss_trackers, unit_losses, strict=False):
            tracker.update_state(loss)
        return {metric.name: metric.result() for metric in self.metrics}

    # -- serialisation ------------------------------------------------------------

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "stages": [keras.saving.serialize_keras_object(s) for s in self.stages],
                "overlap": self.overlap,
                "end_to_end": self.end_to_end,
                "temperature": self.temperature,
                "augment": keras.saving.serialize_keras_object(self.augment),
                "projection_dim": self.projection_dim,
                "hidden_dim": self.hidden_dim,
                "decoder_filters": self.decoder_filters,
                "decoder_block": self.decoder_block,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        stages = [
            keras.saving.deserialize_keras_object(s, custom_objects=custom_objects)
            for s in config.pop("stages")
        ]
        augment = keras.saving.deserialize_keras_object(
            config.pop("augment"), custom_objects=custom_objects
        )
        # Saved before `decoder_block` existed: those decoders were the ResNet block.
        config.setdefault("decoder_block", "resnet")
        return cls(stages, augment=augment, **config)


def _accumulate(gradients: dict, variables, unit_gradients) -> None:
    """Adds a unit's gradients into `gradients` (`id(variable) -> (variable, summed gradient)`).

    A stage shared by two units gets the sum of both units' gradients.
    """
    for variable, gradient in zip(variables, unit_gradients, strict=True):
        if gradient is None:
            continue
        previous = gradients.get(id(variable))
        if previous is not None:
            gradient = previous[1] + gradient
        gradients[id(variable)] = (variable, gradient)


def _require_tensorflow(method: str) -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise NotImplementedError(
            f"LoCo.{method} needs the TensorFlow backend (its train step back-propagates "
            f"unit by unit with tf.GradientTape); the active backend is {backend!r}. Set "
            "KERAS_BACKEND=tensorflow, or train with TensorFlow and load the saved model here."
        )
