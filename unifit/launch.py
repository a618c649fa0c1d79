"""`python -m unifit.launch [+experiment=NAME] [overrides]`: Hydra composes, the pipeline runs.

Hydra stops here: the composed config is converted to validated dataclasses and handed to plain functions.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from unifit.config import ConfigError, check_overrides, from_container, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> int:
    from unifit.pipeline import main_from_config
    from unifit.stage import UserError
    from unifit.training.sft import TrainingFailed

    try:
        cfg = from_container(OmegaConf.to_container(raw, resolve=True))
        cfg.check_before_run()
        code = main_from_config(cfg)
    except (ConfigError, UserError) as error:  # also those raised inside a stage (a model that cannot be loaded)
        print(f"unifit: error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingFailed as error:  # the message names the worker error and the checkpoint a rerun resumes from
        print(f"unifit: error: {error}", file=sys.stderr)
        sys.exit(1)
    if code:
        sys.exit(code)
    return code


if __name__ == "__main__":
    try:  # before Hydra composes: its own error for a moved field would not say where the field went
        check_overrides(sys.argv[1:])
    except ConfigError as error:
        print(f"unifit: error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
