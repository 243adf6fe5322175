"""DualOpt for Keras 3 (jax, torch and tensorflow backends).

``dualopt.keras.DualOpt`` is a ``keras.optimizers.Optimizer``: compile a model
with it, ``fit``, ``save`` and ``load_model`` as with any built-in optimizer.
Every tensor's update is :func:`decoupled_core.step_tensor`, run on
``keras.ops`` (see :mod:`dualopt.keras._xp`), so the rule is the spec's on
every backend; on torch the same core functions run on lists of tensors
(:mod:`dualopt.keras._torch`), tested to give the same bits.

A pretrained backbone fine-tuned with rollback and a new head trained from
scratch, in one line::

    import keras
    import dualopt.keras

    backbone = keras.applications.ResNet50(include_top=False, pooling="avg")  # pretrained weights
    model = keras.Sequential([backbone, keras.layers.Dense(10, name="head")])
    model.compile(
        optimizer=dualopt.keras.DualOpt(1e-3, paradigm={"head": "scratch"}, default_paradigm="finetune"),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=3)   # anchors = the weights when fit() first builds the optimizer
    model.save("model.keras")
    model = keras.models.load_model("model.keras")   # DualOpt is registered as "dualopt>DualOpt"

Which variables are which
-------------------------
``paradigm`` is one of ``"scratch"``, ``"finetune"``, ``"none"`` for every
variable, a mapping ``{layer name or variable path: paradigm}`` (variables no
key matches get ``default_paradigm``), or a callable ``f(variable) ->
paradigm or None``. A key matches a variable when it is a whole run of
segments of the variable's path: ``"head"`` matches ``"sequential/head/kernel"``
and ``"head/bias"`` matches only the bias; the longest matching key wins.

``layer_index`` numbers the layers of each paradigm (spec section 3). The
default makes every variable its own layer in ``var_list`` order, i.e.
``model.trainable_variables`` order for ``fit``: the first trainable variable is
the shallowest. That is the canonical order of spec section 3 (layers in
definition order, kernel / gamma before bias / beta), so the same model gets
the same rates as in torch and Optax; :meth:`DualOpt.layer_rates` shows them
after build. ``layer_index="layer"`` gives all variables of one Keras layer
one key; a sequence gives one key per variable; a mapping gives keys by layer
name / path; a callable ``f(variable) -> int`` computes them.

Anchors (finetune)
------------------
A finetune variable's anchor is a copy of its value when the optimizer is
built, which ``fit`` does on its first step: **load the pretrained weights
before the first ``fit``** (or pass ``anchor``, a mapping ``{variable path:
array}`` or a sequence in ``var_list`` order). On TensorFlow the optimizer is
built while the train step is traced, so the anchor is created by an
initializer, never by an ``assign`` that would run on every step; the tests
check on every backend and compile mode that the anchors are still the pre-fit
weights after several steps. A model built lazily (no ``keras.Input``) on
TensorFlow creates its variables in that same trace, with no value yet: their
anchors are copied from them at the first ``apply`` (``iterations == 0``,
before any update), i.e. they are again the weights at build. ``anchor`` is
not part of ``get_config()``: anchors are optimizer variables and travel in
``.keras`` files.

Resuming with ``load_weights``
------------------------------
``compile`` -> ``load_weights`` -> ``fit`` loads the weights file before the
optimizer is built; Keras's own optimizers then drop its state with a warning.
DualOpt keeps it and, when it is built, checks it against its layout and
restores every variable (``iterations``, ``t``, ``skipped``, moments, anchors),
so the run continues bit for bit; a state of another layout (Keras's Adam,
other paradigms) is refused then. To start a new run from a weights file
(anchors taken from its weights), load it before ``compile``.

Weight decay
------------
DualOpt's ``weight_decay`` is the scratch paradigm's real-time layer-wise pull
toward zero (spec 4.2), applied to the pre-weight inside the update. Keras's
own decoupled weight decay is disabled (``weight_decay=None`` is passed to the
base class), and ``exclude_from_weight_decay`` raises: choose
``paradigm={"bias": "none"}`` or similar instead.

Step count, iterations and non-finite gradients
-----------------------------------------------
DualOpt keeps one step count ``t`` shared by all variables (spec 6 allows it for
frameworks that update every tensor on every call); a variable whose gradient
is ``None`` in an ``apply`` call is not updated, but ``t`` still advances.
With ``nonfinite="skip"`` (default) an ``apply`` call in which any gradient
element is NaN or Inf (checked after Keras's clipping and, with gradient
accumulation, on the accumulated gradient at the update step) changes no model
variable, moment, anchor, ``t``, or EMA average; ``skipped`` counts such
calls. ``iterations`` still advances: it counts batches, and learning-rate
schedules, gradient accumulation and ``ema_overwrite_frequency`` follow it, as a
torch scheduler keeps stepping when a step is skipped. The EMA average starts
(Keras's momentum 0) at the first *applied* call, so a skipped first batch is
not averaged in as Keras's zero-initialised average. With a constant learning
rate a run with skipped calls equals, bit for bit, the run without them.
``nonfinite="propagate"`` makes no check: NaN/Inf flow into the variables and
state. The check is a ``cond`` inside the compiled step (``jax.lax.cond`` on
jax, ``ops.cond`` on tensorflow, a host-side branch on torch). Under a
``tf.distribute`` strategy it is taken on the all-reduced gradients and each
variable's update runs under its own ``cond`` (``merge_call``, which Keras's
update enters, must not run inside one).

Sparse gradients
----------------
``tf.IndexedSlices`` (``Embedding`` layers on TensorFlow) are densified after
Keras's clipping: the rule is dense, so every row's moments decay and every
row is pulled, as for any other gradient. A variable passed twice in one
``var_list`` is refused (Keras's own optimizers step it twice).

Precision of the scalars
------------------------
Inside a Keras train step the step count and the learning rate are tensors, so
the scalars of spec section 5 (``beta ** t``, the bias corrections, ``c``) are
computed on the device in each variable's compute dtype: float64 in a float64
model (where ``beta ** t`` may differ from the host value in the last bit) and
**float32 in a float32 model**, with the same operations in the same order as
the core. ``1 - beta``, epsilon, momentum and the per-layer rates are host
float64 values rounded once to the compute dtype. A float learning rate is
held in a float64 variable whatever ``floatx()`` is (Keras's built-in
optimizers use ``floatx()``), so a float64 model in a float32 session steps
with the float64 eta; a schedule computes in its own dtype (``floatx()`` for
Keras's schedules).

Float64 models: a known Keras limitation
----------------------------------------
Keras 3.15 demotes float64 to float32 on the jax and torch backends
(``keras.backend.result_type("float64", "float64")`` is ``"float32"`` there;
keras-team/keras#23704, #23223): ``ops.tanh`` and ``ops.mean`` on jax,
``ops.matmul``, ``ops.mean``, ``ops.maximum`` and ``ops.divide_no_nan`` on
torch compute in float32 even on float64 inputs. A "float64" model built from
``keras.layers.Dense`` and Keras's losses therefore computes partly in float32
there (about 1e-7 relative), and ``clipnorm`` / ``global_clipnorm`` clip in
float32 on torch. DualOpt's own update keeps float64 on every backend (the
tests replay the float64 spec vectors bit for bit). For a model that must
compute in float64 on jax or torch, write the affected layers and the loss
with the backend's own ops (as ``dualopt.conformance.impl_keras.float64_layers``
does), or use the tensorflow backend.

Slot layout (``optimizer.variables``; ``.keras`` files restore by position)
--------------------------------------------------------------------------
1. ``iterations``; ``learning_rate`` (only when it is a float);
2. Keras's EMA averages (``use_ema``), then gradient accumulators
   (``gradient_accumulation_steps``), one per variable in ``var_list`` order;
3. ``step`` (t), ``skipped``, ``layout`` (one int per variable:
   ``4 * l + {scratch: 1, finetune: 2, none: 3}``, checked on load);
4. per variable in ``var_list`` order: ``m``, ``v`` (adam) or ``momentum``
   (sgd), in the compute dtype;
5. ``anchor`` for each finetune variable in ``var_list`` order.

This order is part of the format and does not change within 1.x. Loading a
state with another layout (variable count, shapes, paradigms or layer numbers)
raises an error naming the first offending variable.
"""


from ._optimizer import DualOpt

__all__ = ['DualOpt']
