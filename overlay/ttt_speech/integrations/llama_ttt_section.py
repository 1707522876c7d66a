"""The `ttt:` section of a `model.family: llama` training config (`LlamaTTTSection`): `LlamaTTTConfig`'s fields
without their `ttt_` prefix (`layers`, `mode`, `layer_type`, `mini_batch_size`, `base_lr`, ...), with their types and
defaults taken from that class, none restated; `use_ttt` is implied by the section being there (`ttt: null` trains
without TTT). Checked by the one config checker (`ttt_speech.config.from_dict`) like every other section.
"""

from __future__ import annotations

import dataclasses
import typing

from ttt_speech.errors import ConfigError
from ttt_speech.integrations.llama_omni import LlamaTTTConfig

PREFIX = "ttt_"


def _post_init(self) -> None:
    if self.layers is not None and not self.layers:
        raise ConfigError("ttt.layers is empty: no layer would get TTT; set `ttt: null` to train without TTT")
    self.model_config()  # LlamaTTTConfig's own checks


def _model_config(self) -> LlamaTTTConfig:
    """The section as the model's config records it (`use_ttt` on, every field with its `ttt_` prefix)."""
    values = {PREFIX + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    try:
        return LlamaTTTConfig(use_ttt=True, **values)
    except ValueError as e:  # its messages name config.ttt_<field>: here that is ttt.<field>
        raise ConfigError(str(e).replace(f"config.{PREFIX}", "ttt.")) from e


_HINTS = typing.get_type_hints(LlamaTTTConfig)
LlamaTTTSection = dataclasses.make_dataclass(
    "LlamaTTTSection",
    [(f.name.removeprefix(PREFIX), _HINTS[f.name],
      dataclasses.field(default=f.default, default_factory=f.default_factory))
     for f in dataclasses.fields(LlamaTTTConfig) if f.name != "use_ttt"],
    namespace={"__post_init__": _post_init, "model_config": _model_config, "__doc__": __doc__,
               "__config_unknown__": {"use_ttt": "implied by a ttt: section; drop it (ttt: null trains without TTT)"}},
)
LlamaTTTSection.__module__ = __name__  # pickled by name (submitit, spawned processes)
