"""python -m oplora.evaluation experiment=… method=… [seed=…] [eval.…]: evaluate one cell (see cell.py)."""

import hydra
from omegaconf import DictConfig

from oplora.config import CONFIG_DIR
from oplora.evaluation.cell import evaluate


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
