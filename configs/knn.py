r"""kNN evaluation of a pretrained encoder: k=200 cosine, temperature-weighted votes.

  python main.py --config=configs/knn.py \
      --config.init_from=workdirs/quickstart --workdir=workdirs/quickstart_knn

The train split's features are the memory, the eval split's the queries
(eval preprocessing, BN in inference mode). Add
--config.eval.compare_random_init=True to record a randomly initialised
encoder of the same architecture alongside.
"""

import ml_collections as mlc

from configs import linear_eval


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The kNN protocol config."""
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; configs/knn.py takes none")
    return linear_eval.base_protocol_config("knn")
