"""The option objects' shared plumbing: plain configs and one `get` for all of them.

Miners, reducers and regularizers are small objects passed to losses and
heads as options (`miner=`, `reducer=`, `embedding_regularizer=`). Each kind
has a `get(identifier)` that accepts the object, its serialized config or
None: all of them are `deserialize_as`. `ConfigObject` gives a plain option
object its `get_config` / `from_config` round trip and a readable `repr`.
"""

from __future__ import annotations

import keras


class ConfigObject:
    """A plain object whose constructor arguments are its config (`cls(**get_config())`).

    Subclasses return their constructor arguments from `get_config`; `repr`
    shows them.
    """

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({options})"


def deserialize_as(identifier, cls: type, arg: str, kind: str, example: str):
    """`identifier` as an instance of `cls`: the object itself, its serialized config, or None.

    The one `get` of the option objects (`miners.get`, `reducers.get`,
    `regularizers.get`).

    Args:
        identifier: None, an instance of `cls`, or a config dict written by
            `keras.saving.serialize_keras_object`.
        cls: the class the object must be an instance of.
        arg: the argument's name, for the message.
        kind: how the message names `cls` (e.g. `"keras_dml.miners.Miner"`).
        example: a constructor call shown in the message.

    Raises:
        ValueError: for anything else, naming `arg`.
    """
    if identifier is None or isinstance(identifier, cls):
        return identifier
    if isinstance(identifier, dict):
        value = keras.saving.deserialize_keras_object(identifier)
        if isinstance(value, cls):
            return value
    raise ValueError(
        f"`{arg}` must be a {kind} (e.g. {example}), its serialized config or None, got "
        f"{identifier!r}."
    )
