"""LLaMA-Omni / Llama (transformers 4.43): TTT layers in the decoder, a cache for `generate`, multi-turn sessions.

`patches/llama-omni/0001-*.patch` makes `OmniSpeechLlamaForCausalLM.__init__` call `apply_ttt(self, config)` before
`post_init()` when `config.use_ttt` is set; `LlamaTTTForCausalLM` does the same for a plain Llama checkpoint, and
`apply_ttt` also works on any constructed `LlamaForCausalLM`. What goes where (docs/llama_omni.md):

- `replace`: `layer.self_attn` becomes `LlamaTTTSelfAttention`; keys `model.layers.{i}.self_attn.ttt.*`.
- `gated_residual`: the attention stays, gets a child `ttt` and a parameter `ttt_gate` [C], and a forward hook adds
  `tanh(ttt_gate) * ttt(x)` to its output; keys `...self_attn.ttt.*`, `...self_attn.ttt_gate`.

The TTT state (float32 fast weights, `ttt_speech.nn.TTTState`) lives in `TTTDynamicCache` next to the KV of the
attention layers. Only the instances in `model.model.layers` are touched (LLaMA-Omni's CTC unit generator builds
its own `LlamaDecoderLayer`s).

Modules: `config` (the `ttt_*` config fields), `cache` (`TTTDynamicCache`), `layers` (`apply_ttt`, the TTT
attention replacement and hook, padding kept out of the state), `loading` (`LlamaTTTForCausalLM`, loads with TTT
keys checked by name), `session` (`ConversationSession`, KV compaction, saved conversations). Every public name is
importable from the package.

Importing the package registers `LlamaTTTModelConfig` ("llama-ttt") with `AutoConfig` and `LlamaTTTForCausalLM`
with `AutoModelForCausalLM` (in `loading`), so Auto loads what `LlamaTTTForCausalLM.save_pretrained` wrote.
"""

from __future__ import annotations

import logging

import transformers

logger = logging.getLogger(__name__)

# the cache and the decoder-layer call signature are those of transformers 4.43 (LLaMA-Omni's pin); transformers 5
# rewrote DynamicCache
if not transformers.__version__.startswith("4."):
    raise ImportError(f"ttt_speech.integrations.llama_omni needs transformers 4.43 (LLaMA-Omni's pin), found "
                      f"{transformers.__version__}")
if not transformers.__version__.startswith("4.43."):
    logger.warning("ttt_speech.integrations.llama_omni is tested with transformers 4.43.4, found %s",
                   transformers.__version__)

from ttt_speech.integrations.llama_omni.cache import TTTDynamicCache  # noqa: E402
from ttt_speech.integrations.llama_omni.config import MODES, LlamaTTTConfig, LlamaTTTModelConfig  # noqa: E402
from ttt_speech.integrations.llama_omni.layers import (  # noqa: E402
    LlamaTTTSelfAttention,
    apply_ttt,
    ttt_forward,
    ttt_modules,
    ttt_parameter_names,
    ttt_state_dict,
)
from ttt_speech.integrations.llama_omni.loading import (  # noqa: E402
    NON_LORA_FILE,
    LlamaTTTForCausalLM,
    TTTLoadReport,
    from_pretrained_ttt,
    load_non_lora_trainables,
    load_ttt_state_dict,
)
from ttt_speech.integrations.llama_omni.session import (  # noqa: E402
    ConversationSession,
    compact_kv,
    load_conversation,
    load_session,
    save_conversation,
    save_session,
)

__all__ = [
    "MODES",
    "NON_LORA_FILE",
    "ConversationSession",
    "LlamaTTTConfig",
    "LlamaTTTForCausalLM",
    "LlamaTTTModelConfig",
    "LlamaTTTSelfAttention",
    "TTTDynamicCache",
    "TTTLoadReport",
    "apply_ttt",
    "compact_kv",
    "from_pretrained_ttt",
    "load_conversation",
    "load_non_lora_trainables",
    "load_session",
    "load_ttt_state_dict",
    "save_conversation",
    "save_session",
    "ttt_forward",
    "ttt_modules",
    "ttt_parameter_names",
    "ttt_state_dict",
]
