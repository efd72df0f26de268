r"""GoogLeNet without the 1x1 reductions before the 3x3 and 5x5 branches (the
naive inception module, Fig. 2a); otherwise the same run as googlenet.py.

  python launch.py --config=configs/googlenet_no_reduction.py
  python -m cnn_lab.summary --config=configs/googlenet.py \
      --compare=configs/googlenet_no_reduction.py   # what the 1x1s save
"""

from configs import googlenet


def get_config():
  config = googlenet.get_config()
  config.name = 'googlenet_no_reduction'
  config.model.reduction = False
  return config
