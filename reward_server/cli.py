"""Entry point: `torchrun --nproc_per_node N serve_reward_model.py [hydra overrides]` (or `reward-server`)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .app import serve
from .config import register_schema

register_schema()

# A source checkout (or editable install) reads conf/ beside the package; an installed wheel its packaged copy.
_SOURCE_CONF = Path(__file__).resolve().parents[1] / "conf"
CONFIG_PATH = str(_SOURCE_CONF) if (_SOURCE_CONF / "serve_reward_model.yaml").is_file() else "pkg://reward_server.conf"


@hydra.main(config_path=CONFIG_PATH, config_name="serve_reward_model", version_base=None)
def main(cfg: DictConfig) -> None:
    sys.exit(serve(OmegaConf.to_object(cfg)))


if __name__ == "__main__":
    main()
