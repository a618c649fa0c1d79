"""`python -m unifit.launch [+experiment=NAME] [overrides]`: Hydra composes, the pipeline runs.

Hydra stops here: the composed config is converted to validated dataclasses and handed to plain functions.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from unifit.config import ConfigError, from_container, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> int:
    from unifit.pipeline import main_from_config

    try:
        cfg = from_container(OmegaConf.to_container(raw, resolve=True))
    except ConfigError as error:
        print(f"unifit: error: {error}", file=sys.stderr)
        sys.exit(2)
    code = main_from_config(cfg)
    if code:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
