r"""Plain-20: resnet20.py without its shortcuts (He et al. 2016, Fig. 6 left);
with option A shortcuts the parameter count is unchanged.

  python launch.py --config=configs/plain20.py
"""

from configs import resnet20


def get_config():
  config = resnet20.get_config()
  config.name = 'plain20'
  config.model.residual = False
  return config
