"""moshi-finetune's `moshi_paths` resolved by moshi's own `CheckpointInfo` (`loaders.CheckpointInfo.from_hf_repo`,
`hf_get`): a Hugging Face repository and / or files, local or `hf://repo/file`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ttt_speech.errors import ConfigError, DataFileNotFound

TINY_RANDOM = "tiny-random"  # our Mimi marker; moshi's `hf_get` passes it through as a path


def checkpoint_info(hf_repo_id: str | None, *, moshi_path: str | None = None, mimi_path: str | None = None,
                    tokenizer_path: str | None = None, config_path: str | None = None) -> dict[str, Any]:
    """`{"moshi_weights", "mimi_weights", "tokenizer", "lm_config"}` from moshi's `CheckpointInfo`.

    With `hf_repo_id`, `CheckpointInfo.from_hf_repo` fetches what is not given (and `config.json`). Without it,
    `moshi_path`, `mimi_path` and `tokenizer_path` are required and nothing is downloaded; `lm_config` is then
    read from `config_path` as `from_hf_repo` reads it, or None (moshi 7B's) without one.
    """
    from moshi.models.loaders import CheckpointInfo, hf_get

    if hf_repo_id is not None or config_path is not None:
        try:
            info = CheckpointInfo.from_hf_repo(hf_repo_id, moshi_weights=moshi_path, mimi_weights=mimi_path,
                                               tokenizer=tokenizer_path, config_path=config_path)
        except (OSError, ValueError) as e:  # huggingface_hub's errors derive from these
            raise ConfigError(f"moshi_paths (hf_repo_id={hf_repo_id!r}): {' '.join(str(e).split())}") from e
    else:
        info = CheckpointInfo(moshi_weights=hf_get(moshi_path), mimi_weights=hf_get(mimi_path),
                              tokenizer=hf_get(tokenizer_path))
    for key, path in (("moshi_path", info.moshi_weights), ("mimi_path", info.mimi_weights),
                      ("tokenizer_path", info.tokenizer)):
        if str(path) != TINY_RANDOM and not Path(path).is_file():
            raise DataFileNotFound(f"moshi_paths.{key}: no file at {path}")
    return {"moshi_weights": info.moshi_weights, "mimi_weights": info.mimi_weights, "tokenizer": info.tokenizer,
            "lm_config": info.lm_config}
