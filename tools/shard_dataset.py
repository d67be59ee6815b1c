"""Turn annotation files and their images into WebDataset tar shards for training at scale.

    python tools/shard_dataset.py --data data/llava_v1_5_mix665k.json --image-folder data/images --out data/shards

Its code and usage are in ``xtuner_plugins/cli/shard_dataset.py``.
"""

import sys

from xtuner_plugins.cli.shard_dataset import main

if __name__ == '__main__':
    sys.exit(main())
