"""Kept for old imports: parking conversations and KV compaction live in `ttt_speech.integrations.llama_omni.session`
(docs/llama_omni.md, "Sessions")."""

from ttt_speech.integrations.llama_omni.session import (
    FORMAT,
    compact_kv,
    load_conversation,
    load_session,
    save_conversation,
    save_session,
)

__all__ = ["FORMAT", "compact_kv", "load_conversation", "load_session", "save_conversation", "save_session"]
